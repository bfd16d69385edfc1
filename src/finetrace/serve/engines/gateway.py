"""``GatewayEngine``: finetrace's gateway in front of an engine process it does not own (llama.cpp, vLLM).

The app (``app.py``, ``routes_openai.py``) talks to it exactly as to the native ``Engine``: it resolves
``model`` names to stored adapters (checked by ``registry.check_adapter``, so admission is the same),
renders chat prompts with the model's own template (``decoding``), writes the ``deploy`` run (with the
engine's name, version and arguments) and one ``serve.request`` event per answer, and gives each answer
its provenance id. The engine only computes tokens: the gateway forwards the rendered prompt's token ids
to its ``/v1/completions`` (streaming), so every engine sees the same tokens as the native one.

Faults: a request whose upstream stream breaks (the process died, a timeout, a bad status) is answered
with ``EngineUnavailable`` (HTTP 503 / an SSE error event, never a partial answer presented as whole)
and logged ``finish_reason: error``, ``delivered: false``. A supervised process that exits is restarted
by the watch thread (``deploy.engine_exited`` / ``deploy.engine_restarted`` events); ``/health`` says
``engine_down`` while it is.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import httpx

from ...decoding import BASE, encode_chat, encode_text
from ...decoding.text import cut_at_stop, normalise_answer
from ...errors import InputError, NotFoundError
from ...models import model_path
from ...models.identity import text_identity
from ...workspace import Workspace
from ..deploy import close_deploy
from ..metrics import Metrics
from ..registry import AdapterInfo, check_adapter
from ..request import GenRequest, QueueFull, Result, ShuttingDown, bind_request
from ..requestlog import RequestLog, log_request
from ..settings import ServeSettings
from .process import EngineUnavailable

log = logging.getLogger("finetrace.serve")


class GatewayEngine:
    """The native ``Engine``'s surface (models, submit, start/stop, stats) over a backend's HTTP engine."""

    def __init__(self, ws: Workspace, base: str, adapters: list[str], settings: ServeSettings, backend):
        from transformers import AutoTokenizer

        self.ws, self.settings, self.backend = ws, settings, backend
        self.base_dir, self.base = model_path(ws, base)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        self.base_identity = text_identity(self.tokenizer)
        self.base_id = self.base.name or self.base.digest
        self.metrics = Metrics()
        self.ledger_lock = threading.RLock()
        self.context_len = int(
            json.loads((self.base_dir / "config.json").read_text()).get("max_position_embeddings", 2048)
        )
        self._adapters: dict[str, AdapterInfo] = {}
        for ref in adapters:
            self._check(ref)
        self._exit = ExitStack()
        self.deploy_run: Any = None  # the open ledger Run of the deployment
        self.request_log: RequestLog | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._inflight = 0
        self._count_lock = threading.Lock()
        self._stopping = False
        self._state = "stopped"
        self._restarts = 0
        self._last_exit: dict | None = None
        self._watch: threading.Thread | None = None
        self._client = httpx.Client(timeout=httpx.Timeout(600, connect=5))

    # -- models and adapters ------------------------------------------------------------------
    def _check(self, ref: str) -> AdapterInfo:
        with self.ledger_lock:
            info = check_adapter(self.ws, ref, self.base, self.base_identity, self.settings.require_eval)
        self._adapters[info.ref] = info
        return info

    def models(self) -> list[dict]:
        out = [
            {
                "id": self.base_id,
                "digest": self.base.digest,
                "kind": "base_model",
                "ref": self.base.ref,
                "engine": self.backend.name,
            }
        ]
        for mid, info in self._adapters.items():
            out.append(
                {
                    "id": mid,
                    "digest": info.digest,
                    "kind": "adapter",
                    "base": self.base.digest,
                    "clearance": info.clearance.status,
                    "engine": self.backend.name,
                }
            )
        return out

    def resolve_model(self, model: str) -> tuple[str, str, str | None]:
        """(public id, upstream model name, adapter digest), like ``Engine.resolve_model``."""
        m = (model or "").strip()
        if m in (self.base_id, self.base.ref, self.base.digest) or m in self.base.aliases:
            return self.base_id, BASE, None
        for mid, info in self._adapters.items():
            if m in (mid, info.digest) or (info.artifact.name == m):
                return mid, mid, info.digest
        raise NotFoundError(
            f"The model `{model}` does not exist", hint=f"served here: {', '.join(x['id'] for x in self.models())}"
        )

    def load_adapter(self, ref: str) -> AdapterInfo:
        info = self._check(ref)
        self.backend.load_adapter(info)
        if self.deploy_run is not None:
            with self.ledger_lock:
                self.deploy_run.input(info.digest)
                self.deploy_run.event("deploy.adapter_loaded", {"adapter": info.digest, "ref": info.ref})
        return info

    def unload_adapter(self, model: str) -> str:
        mid, name, _ = self.resolve_model(model)
        if name == BASE:
            raise InputError("the base model cannot be unloaded", field="model")
        info = self._adapters.pop(mid)
        self.backend.unload_adapter(info)
        if self.deploy_run is not None:
            with self.ledger_lock:
                self.deploy_run.event("deploy.adapter_unloaded", {"adapter": info.digest, "ref": mid})
        return mid

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start (or attach to) the engine, then record the ``deploy`` run with what it is."""
        if self._pool is not None:
            return
        try:
            self.backend.start(self.base_dir, self.base, list(self._adapters.values()))
        except BaseException as exc:
            self._open_deploy()
            close_deploy(self, False, exc)
            raise
        self._open_deploy()
        self.request_log = RequestLog(self.ws.ledger.path, self.settings.log_flush_s, self.settings.ledger_timeout_s)
        self._pool = ThreadPoolExecutor(self.settings.max_batch, thread_name_prefix="finetrace-forward")
        self._stopping, self._state = False, "ok"
        if self.backend.supervised:
            self._watch = threading.Thread(target=self._watch_loop, name="finetrace-engine-watch", daemon=True)
            self._watch.start()

    def _open_deploy(self) -> None:
        with self.ledger_lock:
            self.deploy_run = self._exit.enter_context(
                self.ws.ledger.run(
                    "deploy",
                    config={
                        "base": self.base.ref,
                        "adapters": list(self._adapters),
                        "settings": self.settings.public(),
                        "engine": self.backend.describe(),
                    },
                    inputs=[self.base.digest] + [i.digest for i in self._adapters.values()],
                )
            )

    def _watch_loop(self) -> None:
        while not self._stopping:
            time.sleep(0.2)
            if self._stopping or self.backend.alive():
                continue
            self._state, rc = "engine_down", self.backend.returncode
            self._last_exit = {"returncode": rc, "time": time.time()}
            log.error("the %s engine process exited (status %s): restarting it", self.backend.name, rc)
            with self.ledger_lock:
                self.deploy_run.event("deploy.engine_exited", {"engine": self.backend.name, "returncode": rc})
            try:
                self.backend.restart()
            except (EngineUnavailable, OSError) as exc:  # reported on /health; the next round tries again
                self._last_exit["restart_error"] = str(exc)[:500]
                log.error("restarting the engine failed: %s", exc)
                continue
            self._restarts += 1
            self._state = "ok"
            with self.ledger_lock:
                self.deploy_run.event(
                    "deploy.engine_restarted", {"engine": self.backend.name, "restarts": self._restarts}
                )

    def begin_stop(self, drain_s: float | None = None) -> None:
        self._stopping = True
        self._drain_deadline = time.monotonic() + (self.settings.drain_s if drain_s is None else drain_s)

    def stop(self, timeout: float | None = None, *, interrupted: bool = False, error: BaseException | None = None):
        self.begin_stop(timeout)
        while self._inflight and time.monotonic() < self._drain_deadline:
            time.sleep(0.05)
        if self._pool is not None:
            self._pool.shutdown(wait=not interrupted, cancel_futures=True)
            self._pool = None
        self.backend.stop()
        if self.request_log is not None:
            self.request_log.close(self.settings.ledger_timeout_s + 1)
        if self.deploy_run is not None:
            close_deploy(self, interrupted, error)
        self._state = "stopped"

    @property
    def deployment(self) -> str | None:
        return self.deploy_run.id if self.deploy_run is not None else None

    def stats(self) -> dict:
        return {
            "queued": max(0, self._inflight - self.settings.max_batch),
            "active": min(self._inflight, self.settings.max_batch),
            "adapters": len(self._adapters),
            "engine": {
                "name": self.backend.name,
                "state": self._state,
                "restarts": self._restarts,
                "last_exit": self._last_exit,
                **self.backend.health_info(),
            },
        }

    @property
    def healthy(self) -> bool:
        return self._state == "ok" and self.backend.alive() is not False

    # -- requests -----------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return encode_chat(self.tokenizer, messages, tools)

    def encode_text(self, prompt: str) -> list[int]:
        return encode_text(self.tokenizer, prompt)

    def submit(self, req: GenRequest) -> GenRequest:
        if self._pool is None or self._stopping:
            raise ShuttingDown("the server is shutting down", hint="retry on another replica")
        if req.logprobs is not None or req.labels:
            raise InputError(
                f"logprobs and labels are served by the native engine only, not {self.backend.name}",
                field="logprobs" if req.logprobs is not None else "labels",
            )
        bind_request(self, req)
        if not self.healthy:
            raise EngineUnavailable(
                f"the {self.backend.name} engine is not answering ({self._state})",
                hint="retry in a few seconds; GET /health shows the engine's state",
            )
        with self._count_lock:
            if self._inflight >= self.settings.max_batch + self.settings.max_queue:
                self.metrics.reject()
                raise QueueFull(
                    f"the request queue is full ({self.settings.max_queue} waiting)", hint="retry after a short wait"
                )
            self._inflight += 1
        req.submitted = time.perf_counter()
        self._pool.submit(self._forward, req)
        return req

    def _forward(self, req: GenRequest) -> None:
        try:
            self._forward_one(req)
        finally:
            with self._count_lock:
                self._inflight -= 1

    def _forward_one(self, req: GenRequest) -> None:
        body = {
            "model": self.backend.upstream_name(req.adapter_name),
            "prompt": req.prompt_ids,
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "stream": True,
        }
        if req.seed is not None:
            body["seed"] = req.seed
        if req.stop:
            body["stop"] = req.stop
        parts: list[str] = []
        finish = None
        try:
            with self._client.stream(
                "POST", self.backend.url + "/v1/completions", json=body, headers=self.backend.headers()
            ) as r:
                if r.status_code != 200:
                    raise EngineUnavailable(
                        f"the {self.backend.name} engine answered {r.status_code}: "
                        f"{r.read().decode('utf-8', 'replace')[:300]}"
                    )
                for line in r.iter_lines():
                    if req.cancelled:
                        finish = "cancelled"
                        break
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise EngineUnavailable(f"the {self.backend.name} engine failed: {chunk['error']}")
                    for c in chunk.get("choices", []):
                        if c.get("text"):
                            parts.append(c["text"])
                            self._emit(req, "delta", c["text"])
                        finish = c.get("finish_reason") or finish
        except (httpx.HTTPError, EngineUnavailable, ValueError) as exc:
            err = (
                exc
                if isinstance(exc, EngineUnavailable)
                else EngineUnavailable(
                    f"the {self.backend.name} engine stopped answering mid-request ({type(exc).__name__}: {exc})",
                    hint="retry; GET /health shows whether the engine was restarted",
                )
            )
            return self._fail(req, err, len(parts))
        if finish is None:  # the stream ended without saying why: never present it as a whole answer
            return self._fail(
                req, EngineUnavailable(f"the {self.backend.name} engine's answer ended early", hint="retry"), len(parts)
            )
        raw = cut_at_stop("".join(parts), req.stop)
        text = "" if finish == "cancelled" else (normalise_answer(raw) if req.chat else raw)
        n_out = len(self.tokenizer(raw, add_special_tokens=False)["input_ids"]) if raw else 0
        latency = time.perf_counter() - req.submitted
        res = Result(text, finish, len(req.prompt_ids), n_out, latency, req.provenance_id, req.model)
        self.metrics.observe(req.model, finish, len(req.prompt_ids), n_out, latency)
        self._log(req, text, finish, n_out, latency)  # recorded before it is returned
        self._emit(req, "done", res)

    def _fail(self, req: GenRequest, exc: Exception, n_out: int) -> None:
        latency = time.perf_counter() - req.submitted
        self.metrics.observe(req.model, "error", len(req.prompt_ids), n_out, latency)
        self._log(req, "", "error", n_out, latency, error=str(exc)[:500])
        self._emit(req, "error", exc)

    def _log(self, req, text, finish, n_out, latency, error=None) -> None:
        log_request(self, req, text, finish, n_out, latency, error)

    @staticmethod
    def _emit(req: GenRequest, kind: str, value) -> None:
        if req.on_event is not None:
            try:
                req.on_event(kind, value)
            except Exception:
                log.exception("a request callback failed")


def replay_texts(
    engine: GatewayEngine, rows: list[list[int]], model: str, max_tokens: int, stop: list[str], token_ids: bool = False
) -> list:
    """Greedy answers (normalised text, or with ``token_ids`` the answer's token ids, stop strings not applied, where
    the engine returns them, as vLLM's and the llama.cpp worker's ``return_token_ids`` do) of ``engine``'s
    backend for prompt token rows, one request each, not logged (parity records its own run); an engine
    failure raises ``EngineUnavailable``."""
    _, name, _ = engine.resolve_model(model)
    out: list = []
    for ids in rows:
        body = {
            "model": engine.backend.upstream_name(name),
            "prompt": ids,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "top_p": 1.0,
            "stream": False,
            **({"stop": stop} if stop else {}),
            **({"return_token_ids": True} if token_ids else {}),
        }
        try:
            r = engine._client.post(engine.backend.url + "/v1/completions", json=body, headers=engine.backend.headers())
            r.raise_for_status()
            choice = r.json()["choices"][0]
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            raise EngineUnavailable(f"the {engine.backend.name} engine failed during parity: {exc}") from exc
        if token_ids and "token_ids" in choice:
            out.append([int(t) for t in choice["token_ids"]])
        else:
            out.append(normalise_answer(cut_at_stop(choice["text"], stop)))
    return out
