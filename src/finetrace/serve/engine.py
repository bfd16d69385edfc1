"""The serving engine: one base model, many LoRA adapters, one scheduler thread batching every request.

No HTTP here: the app (``app.py``), the benchmark and the tests all call this.

    engine = Engine(ws, "smollm2", adapters=["legal@1", "support@2"], settings=ServeSettings())
    engine.start()                                  # records the `deploy` run
    res = engine.generate("legal@1", messages=[{"role": "user", "content": "Hi"}], max_tokens=20)
    engine.stop()                                   # finishes in-flight work, flushes the request log

How requests for different adapters share one forward pass: every adapter is loaded into ONE
``PeftModel`` under its own adapter name, and each row of the batch carries the name of its adapter
(``"__base__"`` for the bare base). Each LoRA layer then computes ``W0 x + (alpha/r) B_a A_a x`` with the
row's own adapter: by default with gathered batched matmuls over stacked adapter weights
(``lora_batch.py``, cost independent of how many adapters the batch mixes), or with PEFT's mixed-adapter
batches (``adapter_names=[...]``, ``lora_kernel="peft"``, also the fallback for DoRA and other variants).
The base matmuls are shared by all rows either way.

The scheduler is iteration-level ("continuous") batching over a KV cache:

- requests wait in a bounded queue (``QueueFull`` when it is full: the HTTP layer answers 429);
- each iteration admits waiting requests into free rows: they are prefilled together (left-padded)
  and their KV cache is merged into the running batch's cache (left-padded in time), so new work joins
  without waiting for the running rows to finish;
- one decode step then runs all rows, each picks its token (greedy or seeded sampling), streams the
  new text to its request, and finished rows leave the batch (their cache rows are dropped).

The forward is the decoder's (``decoding.Decoder.forward``): the lean Llama forward of
``decoding/lean.py`` where it covers the model, the model's own forward otherwise; evaluation decodes
through the same one.

With left padding each row keeps its own position ids and attention mask, so a row's answer does not
depend on what it was batched with (up to float rounding).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass

from ..decoding import BASE, Decoder, Seq, best_label, encode_chat, encode_text, score_prompts
from ..decoding.lora import adapter_selector
from ..decoding.threads import release_openmp_team
from ..errors import InputError, NotFoundError
from ..models import load_model
from ..models.identity import text_identity
from ..workspace import Workspace
from .deploy import stop_engine
from .metrics import Metrics
from .registry import AdapterInfo, check_adapter
from .request import GenRequest, QueueFull, Result, ShuttingDown, bind_request
from .requestlog import RequestLog, log_request
from .settings import ServeSettings

log = logging.getLogger("finetrace.serve")


@dataclass
class _Slot:
    info: AdapterInfo
    peft_name: str
    unloading: bool = False


class Engine:
    """A base model with adapters, a request queue and the scheduler thread that serves it."""

    def __init__(self, ws: Workspace, base: str, adapters: list[str] = (), settings: ServeSettings | None = None):
        import torch

        self.ws = ws
        self.settings = settings or ServeSettings()
        self.model, self.tokenizer, self.base = load_model(ws, base)
        self.base_identity = text_identity(self.tokenizer)
        self.base_id = self.base.name or self.base.digest
        self.metrics = Metrics()
        self._torch = torch
        self._slots: dict[str, _Slot] = {}  # public id NAME@V -> slot
        self._counter = 0
        self._lock = threading.RLock()  # guards _slots
        self.ledger_lock = threading.RLock()  # guards the workspace's (shared) ledger connection
        self._queue: queue.Queue[GenRequest] = queue.Queue(maxsize=self.settings.max_queue)
        self._controls: queue.Queue[tuple[Callable[[], object], Future]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._exit = ExitStack()
        self.deploy_run = None
        self.request_log: RequestLog | None = None
        self.decoder = Decoder(
            self.model,
            self.tokenizer,
            None,
            self.settings.max_batch,
            getattr(self.settings, "prefill_chunk", 256),
            prefix_cache_bytes=self.settings.prefix_cache_mb * 2**20,
        )
        self.eos_ids = set(self.decoder.end)
        self.context_len = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        for ref in adapters:
            self._load(ref)

    # -- models and adapters ------------------------------------------------------------------
    def models(self) -> list[dict]:
        """The base and every loaded adapter, as ``{"id", "digest", "kind", ...}``."""
        with self._lock:
            out = [{"id": self.base_id, "digest": self.base.digest, "kind": "base_model", "ref": self.base.ref}]
            for mid, s in self._slots.items():
                if not s.unloading:
                    out.append(
                        {
                            "id": mid,
                            "digest": s.info.digest,
                            "kind": "adapter",
                            "base": self.base.digest,
                            "clearance": s.info.clearance.status,
                        }
                    )
        return out

    def resolve_model(self, model: str) -> tuple[str, str, str | None]:
        """``model`` (base name, ``NAME@V``, ``NAME`` or a digest) -> (public id, peft name, adapter digest)."""
        m = (model or "").strip()
        if m in (self.base_id, self.base.ref, self.base.digest) or m in self.base.aliases:
            return self.base_id, BASE, None
        with self._lock:
            live = {k: s for k, s in self._slots.items() if not s.unloading}
        if m in live:
            return m, live[m].peft_name, live[m].info.digest
        hexpart = m.split(":", 1)[-1].lower()
        if len(hexpart) >= 6 and all(c in "0123456789abcdef" for c in hexpart):
            hits = [(k, s) for k, s in live.items() if s.info.digest.split(":", 1)[1].startswith(hexpart)]
            if len(hits) == 1:
                return hits[0][0], hits[0][1].peft_name, hits[0][1].info.digest
        named = sorted(
            ((s.info.artifact.version or 0, k, s) for k, s in live.items() if s.info.artifact.name == m),
            key=lambda t: t[0],
        )
        if named:
            _, k, s = named[-1]
            return k, s.peft_name, s.info.digest
        raise NotFoundError(
            f"The model `{model}` does not exist", hint=f"served here: {', '.join(x['id'] for x in self.models())}"
        )

    def _load(self, ref: str) -> AdapterInfo:
        """Verify and load an adapter (call from the scheduler thread, or before ``start``)."""
        from peft import PeftModel

        with self.ledger_lock:
            info = check_adapter(self.ws, ref, self.base, self.base_identity, self.settings.require_eval)
        with self._lock:
            mid = info.ref
            if mid in self._slots and not self._slots[mid].unloading:
                return self._slots[mid].info
            self._counter += 1
            name = f"a{self._counter}"
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(info.path), adapter_name=name, is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(info.path), adapter_name=name, is_trainable=False)
        self.model.eval()
        self._refresh_kernel([s.peft_name for s in self._slots.values()] + [name])
        with self._lock:
            self._slots[mid] = _Slot(info, name)
        if self.deploy_run is not None:
            with self.ledger_lock:
                self.deploy_run.input(info.digest)
                self.deploy_run.event("deploy.adapter_loaded", {"adapter": info.digest, "ref": mid})
        log.info("loaded adapter %s (%s) as %s", mid, info.digest, name)
        return info

    def _try_unload(self, mid: str, slot: _Slot) -> bool:
        if self._slots.get(mid) is not slot:
            return True  # already gone (or replaced by a fresh load)
        if any(r.adapter == slot.peft_name for r in self._all_seqs()):
            return False  # rows still decoding with it; retried after the next step
        self.model.delete_adapter(slot.peft_name)
        with self._lock:
            del self._slots[mid]
        self._refresh_kernel([s.peft_name for s in self._slots.values()])
        with self.ledger_lock:
            if self.deploy_run is not None:
                self.deploy_run.event("deploy.adapter_unloaded", {"adapter": slot.info.digest, "ref": mid})
        log.info("unloaded adapter %s", mid)
        return True

    def _refresh_kernel(self, names: list[str]) -> None:
        """Use gathered LoRA (decoding/lora.py) when every layer allows it, else PEFT's mixed batches."""
        self.decoder.model = self.model
        self.decoder.adapters = adapter_selector(self.model, self.settings.lora_kernel, names)

    def load_adapter(self, ref: str, timeout: float = 300) -> AdapterInfo:
        """Hot-load an adapter (verified like at start); safe while serving."""
        return self._control(lambda: self._load(ref), timeout)

    def unload_adapter(self, model: str, timeout: float = 300) -> str:
        """Stop serving an adapter: new requests for it get 404 at once; in-flight ones finish first."""
        mid, peft_name, _ = self.resolve_model(model)
        if peft_name == BASE:
            raise InputError("the base model cannot be unloaded", field="model")
        with self._lock:
            slot = self._slots[mid]
            slot.unloading = True

        def op():
            while not self._try_unload(mid, slot):
                self._step()
            return mid

        return self._control(op, timeout)

    def _control(self, fn: Callable[[], object], timeout: float):
        if self._thread is None or not self._thread.is_alive():
            return fn()
        fut: Future = Future()
        self._controls.put((fn, fut))
        return fut.result(timeout)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Record the ``deploy`` run (inputs: base + adapters), start the request log and the scheduler."""
        if self._thread is not None:
            return
        with self.ledger_lock:
            inputs = [self.base.digest] + [s.info.digest for s in self._slots.values()]
            self.deploy_run = self._exit.enter_context(
                self.ws.ledger.run(
                    "deploy",
                    config={"base": self.base.ref, "adapters": list(self._slots), "settings": self.settings.public()},
                    inputs=inputs,
                )
            )
        self.request_log = RequestLog(self.ws.ledger.path, self.settings.log_flush_s, self.settings.ledger_timeout_s)
        self._stopping, self._drain_deadline = False, None
        release_openmp_team()  # this thread's OpenMP workers (from loading) would slow the scheduler's steps
        self._thread = threading.Thread(target=self._loop, name="finetrace-scheduler", daemon=True)
        self._thread.start()

    def begin_stop(self, drain_s: float | None = None) -> None:
        """Take no new requests (503 ``shutting_down``); after ``drain_s`` seconds (default: the
        settings') answer whatever is still queued or decoding with ``ShuttingDown`` too."""
        deadline = time.monotonic() + (self.settings.drain_s if drain_s is None else drain_s)
        self._drain_deadline = min(deadline, self._drain_deadline or deadline)  # a later call only shortens it
        self._stopping = True

    def stop(
        self, timeout: float | None = None, *, interrupted: bool = False, error: BaseException | None = None
    ) -> None:
        """Drain within ``timeout`` (default ``drain_s``), flush the request log, close the deploy run
        (succeeded, ``interrupted`` or failed with ``error``); see deploy.py."""
        stop_engine(self, timeout, interrupted, error)

    @property
    def deployment(self) -> str | None:
        return self.deploy_run.id if self.deploy_run is not None else None

    def stats(self) -> dict:
        return {
            "queued": self._queue.qsize(),
            "active": len(self.decoder.rows),
            "adapters": len(self._slots),
            "prefix_cache_hit_tokens": self.decoder.prefix_hit_tokens,
        }

    # -- requests -----------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return encode_chat(self.tokenizer, messages, tools)

    def encode_text(self, prompt: str) -> list[int]:
        return encode_text(self.tokenizer, prompt)

    def compile_schema(self, schema: dict, field: str = "response_format.json_schema.schema") -> str:
        """A JSON schema compiled for constrained decoding (``GenRequest.grammar``); InputError naming ``field``."""
        from ..decoding.constrain import compile_json_schema

        return compile_json_schema(self.tokenizer, schema, self._vocab_size(), self.decoder.end, field)

    def _vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def submit(self, req: GenRequest) -> GenRequest:
        """Queue a request; raises NotFoundError (model), InputError (params), QueueFull, ShuttingDown."""
        if self._thread is None:
            raise ShuttingDown("the engine is not running", hint="call Engine.start() first")
        if self._stopping:
            raise ShuttingDown("the server is shutting down", hint="retry on another replica")
        bind_request(self, req)
        req.submitted = time.perf_counter()
        try:
            self._queue.put_nowait(req)
        except queue.Full:
            self.metrics.reject()
            raise QueueFull(
                f"the request queue is full ({self.settings.max_queue} waiting)", hint="retry after a short wait"
            ) from None
        return req

    def generate(
        self,
        model: str,
        *,
        messages: list[dict] | None = None,
        prompt: str | None = None,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] = (),
        timeout: float = 600,
    ) -> Result:
        """Blocking convenience: submit one request and wait for its result."""
        ids = self.encode_chat(messages) if messages is not None else self.encode_text(prompt or "")
        fut: Future = Future()

        def on_event(kind, value):
            if kind == "done":
                fut.set_result(value)
            elif kind == "error":
                fut.set_exception(value)

        self.submit(
            GenRequest(
                ids,
                model,
                max_tokens,
                temperature,
                top_p,
                seed,
                list(stop),
                on_event,
                messages if messages is not None else prompt,
                chat=messages is not None,
            )
        )
        return fut.result(timeout)

    # -- the scheduler ------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._run_controls()
            if self._stopping and self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
                self._answer_all(
                    ShuttingDown(
                        "the server is shutting down and could not finish this request", hint="retry on another replica"
                    )
                )
            if self._stopping and not self.decoder.busy and self._queue.empty() and self._controls.empty():
                return
            try:
                self._step(block=True)
            except Exception as exc:  # a failed batch fails its rows, not the server
                log.exception("decoding failed")
                for s in self._all_seqs():
                    self._fail_request(s.owner, exc, len(s.ids))
                self.decoder.reset()

    def _answer_all(self, exc: Exception) -> None:
        """Fail every decoding and queued request with ``exc`` (the drain bound has passed)."""
        for s in self._all_seqs():
            self._fail_request(s.owner, exc, len(s.ids))
        self.decoder.reset()
        while True:
            try:
                self._fail_request(self._queue.get_nowait(), exc, 0)
            except queue.Empty:
                return

    def _run_controls(self) -> None:
        while True:
            try:
                fn, fut = self._controls.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

    def _all_seqs(self) -> list[Seq]:
        d = self.decoder
        return d.rows + d.waiting + [s for g in d.groups for s in g.seqs]

    def _step(self, block: bool = False) -> None:
        new: list[GenRequest] = []
        free = self.decoder.free()
        while len(new) < free:
            req = self._take(0.05 if not new and not self.decoder.busy and block else 0)
            if req is None:
                break
            new.append(req)
        new = [r for r in new if not self._drop_cancelled(r) and self._adapter_live(r)]
        self._classify_requests([r for r in new if r.labels])
        for req in new:
            if not req.labels:
                try:  # a request that cannot start (a seed the generator refuses, ...) fails alone
                    self.decoder.add(self._seq(req))
                except Exception as exc:
                    log.warning("request %s refused at admission: %s", req.provenance_id, exc)
                    self._fail_request(req, exc, 0)
        for s in self._all_seqs():
            s.cancelled = s.owner.cancelled
        if self.decoder.busy:
            for s in self.decoder.step():
                text = "" if s.finish == "cancelled" else s.answer
                self._finish_request(s.owner, text, s.finish, len(s.ids), s)

    def classify(self, prompt_rows: list[list[int]], labels: list[str], adapter_name: str = BASE) -> list[str]:
        """The best-scoring label for each prompt (``decoding.labels``, as evaluation scores); call from the
        scheduler thread or before ``start``."""
        names = [adapter_name] * len(prompt_rows)
        return [best_label(labels, s) for s in self.label_scores(prompt_rows, labels, names, best_only=True)]

    def label_scores(
        self, prompt_rows: list[list[int]], labels: list[str], names: list[str], best_only: bool = False
    ) -> list[list[float | None]]:
        return score_prompts(
            self.model,
            self.tokenizer,
            prompt_rows,
            labels,
            self.decoder.adapters,
            names,
            self.settings.max_batch,
            best_only=best_only,
            decoder=self.decoder,
        )

    def _classify_requests(self, reqs: list[GenRequest]) -> None:
        """Label-constrained requests: scored together per label set; the answer is always one label."""
        groups: dict[tuple, list[GenRequest]] = {}
        for r in reqs:
            groups.setdefault(tuple(r.labels), []).append(r)
        for labels, rs in groups.items():
            try:
                scores = self.label_scores(
                    [r.prompt_ids for r in rs],
                    list(labels),
                    [r.adapter_name for r in rs],
                    best_only=all(r.logprobs is None for r in rs),  # logprobs report every label's score
                )
            except Exception as exc:
                for r in rs:
                    self._fail_request(r, exc, 0)
                continue
            for r, row in zip(rs, scores):
                best = best_label(list(labels), row)
                ids = self.tokenizer(best, add_special_tokens=False)["input_ids"]
                seq = Seq(r.prompt_ids, r.adapter_name, ids=ids, text=best, finish="stop")
                if r.logprobs is not None:  # the label's scored log p (label tokens + end of turn), and the others
                    seq.token_logprobs = [
                        (
                            best,
                            row[labels.index(best)],
                            sorted(zip(labels, row), key=lambda t: -t[1])[: max(r.logprobs, 1)],
                        )
                    ]
                self._finish_request(r, best, "stop", len(ids), seq)

    def _seq(self, req: GenRequest) -> Seq:
        constraint = None
        if req.grammar is not None:
            from ..decoding.constrain import JsonConstraint

            constraint = JsonConstraint(self.tokenizer, req.grammar, self._vocab_size(), self.decoder.end)
        return Seq(
            req.prompt_ids,
            req.adapter_name,
            req.max_tokens,
            req.temperature,
            req.top_p,
            req.seed,
            list(req.stop),
            req.logprobs,
            req.chat,
            on_delta=lambda text, req=req: self._emit(req, "delta", text),
            owner=req,
            constraint=constraint,
        )

    def _take(self, wait: float) -> GenRequest | None:
        """The next waiting request (waiting up to ``wait`` s for one), or None while a control is pending.

        Checking the controls and taking the request happen under the queue's own lock, the one ``submit``
        puts under: a control queued before a request therefore always runs before that request is
        admitted, and a request leaves the bounded queue only to enter the batch."""
        q = self._queue
        with q.not_empty:
            if wait and not q._qsize() and self._controls.empty():
                q.not_empty.wait(wait)
            if not q._qsize() or not self._controls.empty():
                return None
            req = q._get()
            q.not_full.notify()
            return req

    def _adapter_live(self, req: GenRequest) -> bool:
        """False (and the request fails with 'not found') if its adapter was unloaded while it waited."""
        if req.adapter_name == BASE or any(s.peft_name == req.adapter_name for s in self._slots.values()):
            return True
        self._emit(req, "error", NotFoundError(f"The model `{req.model}` was unloaded before this request ran"))
        return False

    def _drop_cancelled(self, req: GenRequest) -> bool:
        if req.cancelled:
            self._finish_request(req, "", "cancelled", 0)
        return req.cancelled

    def _emit(self, req: GenRequest, kind: str, value) -> None:
        if req.on_event is None:
            return
        try:
            req.on_event(kind, value)
        except Exception:
            log.exception("a request callback failed")

    def _fail_request(self, req: GenRequest, exc: Exception, n_out: int) -> None:
        """Answer ``req`` with ``exc`` and record it (finish_reason ``error``): a failure is never silent."""
        latency = time.perf_counter() - req.submitted
        self.metrics.observe(req.model, "error", len(req.prompt_ids), n_out, latency)
        self._log_request(req, "", "error", n_out, latency, error=str(exc)[:500] or type(exc).__name__)
        self._emit(req, "error", exc)

    def _finish_request(self, req: GenRequest, text: str, finish: str, n_out: int, seq: Seq | None = None) -> None:
        latency = time.perf_counter() - req.submitted
        res = Result(
            text,
            finish,
            len(req.prompt_ids),
            n_out,
            latency,
            req.provenance_id,
            req.model,
            list(seq.ids) if seq is not None else [],
            seq.token_logprobs if seq is not None else None,
        )
        self.metrics.observe(req.model, finish, len(req.prompt_ids), n_out, latency)
        self._log_request(req, text, finish, n_out, latency)
        self._emit(req, "done", res)

    def _log_request(
        self, req: GenRequest, text: str, finish: str, n_out: int, latency: float, error: str | None = None
    ) -> None:
        log_request(self, req, text, finish, n_out, latency, error)
