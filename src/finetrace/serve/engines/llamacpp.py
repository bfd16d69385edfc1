"""The llama.cpp backend: the base exported to GGUF once, each adapter converted to a GGUF LoRA adapter
once (both cached under ``WORKSPACE/cache/gguf/`` by digest), and one ``llamacpp_worker`` process per
base that serves them all, choosing the adapter per request (no batching across requests: see the
worker's docstring). Needs the ``llamacpp`` extra (``pip install 'finetrace[llamacpp]'``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx

from ...errors import DependencyError
from ..gguf_export import publish, write_gguf, write_gguf_lora
from .process import EngineProcess, EngineUnavailable, LaunchedEngine, free_port, python_module

WORKER = "finetrace.serve.engines.llamacpp_worker"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


class LlamaCppBackend(LaunchedEngine):
    name = "llamacpp"
    supervised = True

    def __init__(self, ws, threads: int = 2, n_ctx: int = 2048, qtype: str = "f32"):
        try:
            import llama_cpp
        except ImportError as exc:
            raise DependencyError(
                "--engine llamacpp needs llama-cpp-python",
                hint="pip install 'finetrace[llamacpp]' (builds llama.cpp: ~4-7 min)",
            ) from exc
        self.version = llama_cpp.__version__
        self.ws, self.threads, self.n_ctx, self.qtype = ws, threads, n_ctx, qtype
        self.cache = Path(ws.root) / "cache" / "gguf"
        self.proc: EngineProcess | None = None
        self.files: dict[str, dict] = {}  # what was converted: {ref: {"gguf": path, "gguf_sha256": ...}}
        self.base_dir: Path | None = None
        self.base_id = ""

    # -- conversion ---------------------------------------------------------------------------
    def base_gguf(self, base_dir: Path, base_digest: str) -> Path:
        path = self.cache / f"{base_digest.split(':')[-1]}.{self.qtype}.gguf"
        if not path.is_file():
            self.cache.mkdir(parents=True, exist_ok=True)
            part = write_gguf(base_dir, path.with_name(path.name + ".part"), qtype=self.qtype)
            publish(part, path)
        return path

    def adapter_gguf(self, info) -> Path:
        path = self.cache / f"{info.digest.split(':')[-1]}.lora.gguf"
        if not path.is_file():
            self.cache.mkdir(parents=True, exist_ok=True)
            write_gguf_lora(info.path, self.base_dir, path, name=info.ref)
        self.files[info.ref] = {"gguf": str(path), "gguf_sha256": _sha256(path), "adapter": info.digest}
        return path

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, base_dir: Path, base, adapters: list) -> None:
        self.base_dir, self.base_id = base_dir, base.name or base.digest
        gguf = self.base_gguf(base_dir, base.digest)
        self.files["__base__"] = {"gguf": str(gguf), "gguf_sha256": _sha256(gguf), "base": base.digest}
        argv = python_module(WORKER) + [
            "--model",
            str(gguf),
            "--served-name",
            self.base_id,
            "--threads",
            str(self.threads),
            "--n-ctx",
            str(self.n_ctx),
        ]
        for info in adapters:
            argv += ["--lora", f"{info.ref}={self.adapter_gguf(info)}"]
        port = free_port()
        self.proc = EngineProcess(
            argv + ["--port", str(port)], port, self.cache.parent / "engines" / f"llamacpp-{port}.log"
        )
        self.process.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    @property
    def url(self) -> str:
        return self.process.url

    def headers(self) -> dict:
        return {}

    def upstream_name(self, adapter_name: str) -> str:
        return self.base_id if adapter_name == "__base__" else adapter_name

    def load_adapter(self, info) -> None:
        r = httpx.post(
            self.url + "/v1/load_lora_adapter", json={"lora_name": info.ref, "lora_path": str(self.adapter_gguf(info))}
        )
        if r.status_code != 200:
            raise EngineUnavailable(f"llama.cpp refused adapter {info.ref}: {r.text[:300]}")
        # a restart must bring it back: it joins the worker's command line
        self.process.argv[-2:-2] = ["--lora", f"{info.ref}={self.files[info.ref]['gguf']}"]

    def unload_adapter(self, info) -> None:
        httpx.post(self.url + "/v1/unload_lora_adapter", json={"lora_name": info.ref})
        spec = f"{info.ref}={self.files.get(info.ref, {}).get('gguf')}"
        if spec in self.process.argv:
            i = self.process.argv.index(spec)
            del self.process.argv[i - 1 : i + 1]

    def describe(self) -> dict:
        """What the deploy run records: engine, version, the exact worker command and converted files."""
        return {
            "name": self.name,
            "version": f"llama-cpp-python {self.version}",
            "mode": "launch",
            "args": list(self.process.argv) if self.proc else [],
            "files": self.files,
            "batching": "none: one request at a time per process (adapters switch per request)",
        }

    def health_info(self) -> dict:
        return {"pid": self.proc.proc.pid if self.proc and self.proc.proc else None}
