"""The llama.cpp engine process: one GGUF base in one ``llama_cpp.Llama``, LoRA adapters chosen per request.

    python -m finetrace.serve.engines.llamacpp_worker --model base.gguf --port 8101 \
        --lora alpha@1=alpha.gguf --lora beta@1=beta.gguf

It speaks the subset of the OpenAI API that finetrace's gateway forwards (``/v1/completions`` with a
prompt of token ids or text, streaming or not; ``/v1/models``; ``/health``; ``/version``) and vLLM's
runtime adapter API (``POST /v1/load_lora_adapter``, ``/v1/unload_lora_adapter``), so the gateway drives
it and vLLM the same way. It never writes the ledger and knows nothing of provenance.

The ``model`` field picks the adapter: before a request the worker sets exactly that adapter on the
context (``llama_set_adapters_lora``, scale 1: llama.cpp applies ``alpha / r`` itself) and forgets the KV
prefix cache when the adapter changed. **llama.cpp does not batch**: one ``Llama`` context decodes one
request at a time, so requests (for the same adapter or different ones) are served one after another
under a lock. Throughput beyond one stream needs more processes or another engine (vLLM).
"""

import argparse
import ctypes
import json
import threading
import time
from typing import Any

from ...environment import cpu_flags

BASE = "__base__"


def open_llama(model: str, **kwargs):
    """``llama_cpp.Llama(model, **kwargs)``, without ggml's extra weight buffers on a CPU with AMX.

    llama-cpp-python 0.3.36, built by pip for such a CPU (``-march=native``), repacks Q8_0 and Q4_x weights
    into AMX buffers and then dies with SIGSEGV on the first prompt of more than one token: SmolLM2's
    Q4_1 GGUF and a tiny Q8_0 one alike, measured here (test_engines.py keeps the tiny case). The
    Python API has no switch for those buffers, so the default model parameters are changed for this one
    load. What it costs: the extra buffers also hold ggml's CPU repack of Q4_0/IQ4_NL/Q4_K, which is then
    not used on AMX machines; elsewhere nothing changes."""
    import llama_cpp

    if "amx_int8" not in cpu_flags():
        return llama_cpp.Llama(model, **kwargs)
    lib = llama_cpp.llama_cpp
    default = lib.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    with _LOAD_LOCK:
        lib.llama_model_default_params = without_extra_buffers
        try:
            return llama_cpp.Llama(model, **kwargs)
        finally:
            lib.llama_model_default_params = default


_LOAD_LOCK = threading.Lock()


class Worker:
    def __init__(self, model: str, n_ctx: int, threads: int, served_name: str):
        import llama_cpp

        self.lc = llama_cpp
        self.llm = open_llama(model, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.served_name = served_name
        self.adapters: dict[str, Any] = {}  # name -> llama_adapter_lora_p
        self.paths: dict[str, str] = {}
        self.current: str | None = BASE
        self.lock = threading.Lock()
        self.scratch: str | None = None  # made for the first converted adapter folder; removed by ``close``

    def close(self) -> None:
        """Remove the adapters this process converted (called when it stops, SIGTERM included)."""
        if self.scratch is not None:
            import shutil

            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None

    def load(self, name: str, path: str) -> None:
        with self.lock:
            if name in self.adapters:
                raise ValueError(f"adapter {name!r} is already loaded")
            path = self._as_gguf(name, path)
            ad = self.lc.llama_adapter_lora_init(self.llm._model.model, path.encode())
            if not ad:
                raise ValueError(f"llama.cpp could not load the LoRA adapter {path}")
            self.adapters[name], self.paths[name] = ad, path

    def _as_gguf(self, name: str, path: str) -> str:
        """A PEFT adapter folder (what vLLM's runtime API is given) is converted next to itself first."""
        from pathlib import Path

        if not Path(path).is_dir():
            return path
        from ..gguf_export import write_gguf_lora

        md = self.llm.metadata
        cfg = {
            "num_attention_heads": int(md["llama.attention.head_count"]),
            "num_key_value_heads": int(md.get("llama.attention.head_count_kv", md["llama.attention.head_count"])),
        }
        if self.scratch is None:
            import tempfile

            self.scratch = tempfile.mkdtemp(prefix="finetrace-llamacpp-")
        out = Path(self.scratch) / f"{len(self.paths)}-{abs(hash(name))}.gguf"
        return str(write_gguf_lora(path, None, out, name, base_cfg=cfg))

    def unload(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                raise KeyError(name)
            if self.current == name:
                self._select(BASE)
            self.lc.llama_adapter_lora_free(self.adapters.pop(name))
            self.paths.pop(name)

    def _select(self, name: str) -> None:
        """Set exactly ``name``'s adapter (or none) on the context; drop the KV cache if it changed."""
        if name == self.current:
            return
        ctx = self.llm._ctx.ctx
        if name == BASE:
            rc = self.lc.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            arr = (self.lc.llama_adapter_lora_p_ctypes * 1)(self.adapters[name])
            rc = self.lc.llama_set_adapters_lora(ctx, arr, 1, (ctypes.c_float * 1)(1.0))
        if rc != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed ({rc})")
        self.llm.reset()  # the cached prefix was computed with other weights
        self.current = name

    def model_name(self, model: str | None) -> str:
        if not model or model == self.served_name:
            return BASE
        if model not in self.adapters:
            raise KeyError(model)
        return model

    def complete(self, body: dict):
        """Yield (text piece, finish_reason or None, usage or None) for a completion request."""
        name = self.model_name(body.get("model"))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            prompt = prompt[0]
        if not prompt:
            raise ValueError("prompt must be a non-empty string or list of token ids")
        temp = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
        kw: dict[str, Any] = {
            "max_tokens": int(body.get("max_tokens") or 16),
            "temperature": temp,
            "top_p": float(body.get("top_p") or 1.0),
            "top_k": 0 if temp == 0 else 40,
            "min_p": 0.0,
            "repeat_penalty": 1.0,
            "stop": body.get("stop") or [],
            "seed": body.get("seed"),
            "stream": True,
        }
        with self.lock:
            self._select(name)
            n_prompt = len(prompt) if isinstance(prompt, list) else len(self.llm.tokenize(prompt.encode(), False))
            chunks: Any = self.llm.create_completion(prompt, **kw)  # stream=True: an iterator of dicts
            for chunk in chunks:
                c = chunk["choices"][0]
                yield c.get("text") or "", c.get("finish_reason"), None
            yield "", None, {"prompt_tokens": n_prompt}  # the gateway counts completion tokens itself

    def token_ids(self, body: dict) -> list[int]:
        """Greedy or sampled completion as token ids, up to the end of turn (``return_token_ids``: parity
        compares tokens, which text cannot do where a token is an incomplete UTF-8 byte)."""
        name = self.model_name(body.get("model"))
        temp = float(body.get("temperature") or 0.0)
        out: list[int] = []
        with self.lock:
            self._select(name)
            for tok in self.llm.generate(
                body["prompt"],
                top_k=0 if temp == 0 else 40,
                top_p=float(body.get("top_p") or 1.0),
                min_p=0.0,
                temp=temp,
                repeat_penalty=1.0,
                reset=True,
            ):
                if self.lc.llama_vocab_is_eog(self.llm._model.vocab, tok) or len(out) >= int(body["max_tokens"]):
                    break
                out.append(int(tok))
        return out


def make_app(worker: Worker):
    import llama_cpp
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="finetrace llama.cpp engine")

    def err(status: int, msg: str, code: str):
        return JSONResponse({"error": {"message": msg, "type": "invalid_request_error", "code": code}}, status)

    @app.get("/health")
    def health():
        return {"status": "ok", "adapters": sorted(worker.adapters)}

    @app.get("/version")
    def version():
        return {"version": llama_cpp.__version__, "engine": "llama.cpp (llama-cpp-python)"}

    @app.get("/v1/models")
    def models():
        ids = [worker.served_name] + sorted(worker.adapters)
        return {"object": "list", "data": [{"id": i, "object": "model", "owned_by": "llama.cpp"} for i in ids]}

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request):
        body = await request.json()
        try:
            worker.load(body["lora_name"], body["lora_path"])
        except (KeyError, ValueError) as exc:
            return err(400, str(exc), "load_failed")
        return {"loaded": body["lora_name"]}

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request):
        body = await request.json()
        try:
            worker.unload(body["lora_name"])
        except KeyError:
            return err(404, f"no adapter {body.get('lora_name')!r}", "not_found")
        return {"unloaded": body["lora_name"]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        try:
            worker.model_name(body.get("model"))
        except KeyError:
            return err(404, f"The model `{body.get('model')}` does not exist", "model_not_found")
        cid, created, model = f"cmpl-{time.time_ns()}", int(time.time()), body.get("model") or worker.served_name

        def chunk(text, finish, usage=None):
            d = {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            }
            if usage is not None:
                d["choices"], d["usage"] = [], usage
            return d

        if not body.get("stream"):
            import asyncio

            if body.get("return_token_ids") and isinstance(body.get("prompt"), list):
                ids = await asyncio.to_thread(worker.token_ids, body)
                out = chunk(worker.llm.detokenize(ids).decode("utf-8", "replace"), "stop")
                out["choices"][0]["token_ids"] = ids
                return out
            parts = await asyncio.to_thread(lambda: list(worker.complete(body)))
            finish = next((f for _, f, _ in parts if f), "length")
            out = chunk("".join(t for t, _, _ in parts), finish)
            out["usage"] = parts[-1][2]
            return out

        def events():  # a sync generator: Starlette runs it in a thread, one item at a time
            for text, finish, usage in worker.complete(body):
                if usage is not None:
                    yield f"data: {json.dumps(chunk('', None, usage))}\n\n"
                else:
                    yield f"data: {json.dumps(chunk(text, finish))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the base model, a GGUF file")
    p.add_argument("--served-name", default="base", help="the model id of the bare base")
    p.add_argument("--lora", action="append", default=[], help="NAME=PATH of a GGUF LoRA adapter (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    worker = Worker(a.model, a.n_ctx, a.threads, a.served_name)
    for spec in a.lora:
        name, _, path = spec.partition("=")
        worker.load(name, path)
    import signal
    import sys

    import uvicorn

    # uvicorn shuts down on SIGTERM and then re-raises it to the handler that was there before: make that
    # one an exit, so that ``finally`` runs (the default handler would end the process on the spot)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(make_app(worker), host=a.host, port=a.port, log_level="warning")
    finally:
        worker.close()


if __name__ == "__main__":
    main()
