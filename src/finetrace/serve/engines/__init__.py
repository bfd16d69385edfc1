"""Serving engines behind finetrace's gateway: ``native`` (finetrace's own, the default), ``llamacpp``, ``vllm``.

    engine = open_engine(ws, "smollm2", ["legal@1"], settings, engine="llamacpp")   # same surface as Engine

The gateway (``app.py``, ``routes_openai.py``, ``gateway.py``) owns what users and auditors rely on: the
OpenAI API, keys, limits, provenance ids, ``serve.request`` events, adapter admission and parity. A
backend only starts (or attaches to) an engine and runs tokens. Its small interface:

    start(base_dir, base_artifact, adapters)   launch the process or attach; load the adapters
    url, headers(), upstream_name(adapter)     where and how to forward ``/v1/completions``
    load_adapter(info) / unload_adapter(info)  at run time
    alive(), returncode, restart(), stop()     health and supervision (``supervised``: a process we own)
    describe()                                 name, version, arguments: recorded in the deploy run

    gateway.py          GatewayEngine: the native Engine's surface over a backend
    process.py          a supervised engine process (start, health wait, kill, restart)
    llamacpp.py         GGUF conversion (cached) + one llamacpp_worker process per base
    llamacpp_worker.py  the llama.cpp process (llama-cpp-python), adapters chosen per request
    vllm.py             `vllm serve` launch line, or attach to a running vLLM (runtime LoRA API)
"""

from __future__ import annotations

from ...errors import InputError

ENGINES = ("native", "llamacpp", "vllm")


def open_engine(
    ws,
    base: str,
    adapters: list[str],
    settings,
    engine: str = "native",
    upstream: str | None = None,
    upstream_key: str | None = None,
    threads: int = 2,
):
    """The engine for ``finetrace serve --engine``: the native ``Engine`` or a ``GatewayEngine``."""
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}", hint=f"one of {', '.join(ENGINES)}", field="--engine")
    if upstream and engine != "vllm":
        raise InputError("--upstream attaches to a running vLLM", hint="add --engine vllm", field="--upstream")
    if engine == "native":
        from ..engine import Engine

        return Engine(ws, base, list(adapters), settings)
    from .gateway import GatewayEngine

    backend: object
    if engine == "llamacpp":
        from .llamacpp import LlamaCppBackend

        backend = LlamaCppBackend(ws, threads=threads)
    else:
        from .vllm import VllmBackend

        backend = VllmBackend(upstream, upstream_key)
    return GatewayEngine(ws, base, list(adapters), settings, backend)
