"""The vLLM backend: launch ``vllm serve`` with the stored adapters, or attach to a running vLLM.

Launch (``--engine vllm``): the base folder and every adapter folder are materialised from the store and
re-hashed against their digests (``registry.check_adapter``), then

    vllm serve BASE_DIR --served-model-name BASE --host 127.0.0.1 --port PORT --generation-config vllm
        --enable-lora --max-loras N --max-lora-rank R --lora-modules NAME@V=DIR ...

``--max-loras`` is the number of adapters; ``--max-lora-rank`` the largest rank among them, rounded up to
the next value vLLM accepts (its ``LoRAConfig.max_lora_rank`` is one of 1, 8, 16, 32, 64, 128, 256,
320, 512; the real maximum is recorded beside it). ``--generation-config vllm`` keeps vLLM from applying
the model's ``generation_config.json`` sampling defaults, so the gateway's parameters are what decodes.

Attach (``--engine vllm --upstream URL``): nothing is launched; adapters are loaded through vLLM's runtime
API (``POST /v1/load_lora_adapter {"lora_name", "lora_path"}``, which needs the server started with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), unloaded with ``/v1/unload_lora_adapter``; its ``/version``
is recorded. The attach path is tested against finetrace's llama.cpp worker, which speaks the same
runtime API; vLLM itself cannot run on these machines (see docs/serve.md for what was and was not run).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx

from ...errors import DependencyError, InputError
from .process import EngineProcess, EngineUnavailable, LaunchedEngine, free_port

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def adapter_rank(path: str | Path) -> int:
    """The largest LoRA rank of an adapter folder (``r`` and any ``rank_pattern`` value)."""
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    return max([int(cfg.get("r", 8))] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()])


def max_lora_rank(ranks: list[int]) -> int:
    """The smallest rank vLLM accepts that holds every adapter's rank."""
    top = max(ranks, default=1)
    for r in VLLM_MAX_LORA_RANKS:
        if r >= top:
            return r
    raise InputError(f"an adapter has rank {top}; vLLM serves ranks up to {VLLM_MAX_LORA_RANKS[-1]}", field="r")


def vllm_command(
    base_dir: str | Path,
    served_name: str,
    adapters: list[tuple[str, str | Path]],
    port: int,
    host: str = "127.0.0.1",
    executable: str = "vllm",
) -> list[str]:
    """The ``vllm serve`` argument list for a base folder and ``(name, folder)`` adapters (see module doc)."""
    argv = [
        executable,
        "serve",
        str(base_dir),
        "--served-model-name",
        served_name,
        "--host",
        host,
        "--port",
        str(port),
        "--generation-config",
        "vllm",
    ]
    if adapters:
        argv += [
            "--enable-lora",
            "--max-loras",
            str(len(adapters)),
            "--max-lora-rank",
            str(max_lora_rank([adapter_rank(p) for _, p in adapters])),
            "--lora-modules",
            *[f"{name}={path}" for name, path in adapters],
        ]
    return argv


class VllmBackend(LaunchedEngine):
    name = "vllm"

    def __init__(self, upstream: str | None = None, api_key: str | None = None):
        self.upstream, self.api_key = (upstream.rstrip("/") if upstream else None), api_key
        self.supervised = upstream is None
        self.proc: EngineProcess | None = None
        self.version: str | None = None
        self.real_max_rank = 0
        self.base_id = ""

    def start(self, base_dir: Path, base, adapters: list) -> None:
        self.base_id = base.name or base.digest
        if self.upstream is None:
            exe = shutil.which("vllm")
            if exe is None:
                raise DependencyError(
                    "--engine vllm needs the `vllm` command (vLLM on a CUDA machine)",
                    hint="install vLLM where the GPUs are, or attach with --upstream URL",
                )
            port = free_port()
            argv = vllm_command(base_dir, self.base_id, [(i.ref, i.path) for i in adapters], port, executable=exe)
            self.proc = EngineProcess(argv, port, Path(base_dir).parent / f"vllm-{port}.log", start_timeout_s=900)
            self.process.start()
        else:
            for info in adapters:
                self.load_adapter(info)
        self.real_max_rank = max([adapter_rank(i.path) for i in adapters], default=0)
        try:
            self.version = httpx.get(self.url + "/version", headers=self.headers(), timeout=5).json().get("version")
        except (httpx.HTTPError, ValueError):
            self.version = None

    @property
    def url(self) -> str:
        return self.upstream or self.process.url

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def upstream_name(self, adapter_name: str) -> str:
        return self.base_id if adapter_name == "__base__" else adapter_name

    def load_adapter(self, info) -> None:
        r = httpx.post(
            self.url + "/v1/load_lora_adapter",
            headers=self.headers(),
            timeout=600,
            json={"lora_name": info.ref, "lora_path": str(info.path)},
        )
        if r.status_code != 200:
            raise EngineUnavailable(
                f"vLLM refused adapter {info.ref} ({r.status_code}): {r.text[:300]}",
                hint="start vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora",
            )

    def unload_adapter(self, info) -> None:
        httpx.post(self.url + "/v1/unload_lora_adapter", headers=self.headers(), json={"lora_name": info.ref})

    def alive(self) -> bool | None:
        if self.proc is not None:
            return self.proc.alive()
        try:
            return httpx.get(self.url + "/health", headers=self.headers(), timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def describe(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "mode": "attach" if self.upstream else "launch",
            "upstream": self.upstream,
            "args": list(self.process.argv) if self.proc else [],
            "real_max_lora_rank": self.real_max_rank,
            "env": {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING")},
        }

    def health_info(self) -> dict:
        return {"url": self.url}
