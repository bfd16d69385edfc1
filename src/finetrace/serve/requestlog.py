"""The request log: every answered request becomes a ``serve.request`` ledger event, written off the hot path.

Request threads hand events to ``RequestLog.add`` (a list append under a lock); a background writer
appends them every ``flush_s`` seconds in ONE ledger transaction per batch, on its own SQLite connection,
so logging never serialises decoding. ``flush()`` waits until everything added so far is in the ledger
(used before resolving a provenance id) and ``close()`` flushes the rest on shutdown.

Nothing here waits without a bound. A write that fails (a locked ledger, a full disk, a broken file) is
retried for ``retry_s`` seconds; after that, and for whatever ``close(timeout)`` could not write in time,
the events go to a spill file, ``spill/serve.request-*.jsonl`` in the workspace, with a warning naming
it: a request record is never dropped silently, and a sick ledger never keeps the server from exiting.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from ..atomic import write_text
from ..canonical import canonical_json, sha256_bytes
from ..ledger.log import Ledger, now

log = logging.getLogger("finetrace.serve")

EVENT = "serve.request"


def request_event(
    req,
    deployment: str | None,
    base_digest: str,
    text: str,
    finish: str,
    n_out: int,
    latency: float,
    error: str | None = None,
    log_content: bool = False,
) -> dict:
    """The ``serve.request`` payload for one answered (or failed, or abandoned) ``GenRequest``."""
    event = {
        "provenance_id": req.provenance_id,
        "deployment": deployment,
        "time": now(),
        "model": req.model,
        "base_model": base_digest,
        "adapter": req.adapter_digest,
        "endpoint": req.endpoint,
        "time_submitted_unix": time.time() - latency,
        "input_sha256": sha256_bytes(canonical_json(req.input_payload)),
        "output_sha256": sha256_bytes(text.encode("utf-8")),
        "prompt_tokens": len(req.prompt_ids),
        "completion_tokens": n_out,
        "latency_ms": round(latency * 1000, 3),
        "finish_reason": finish,
        "params": {
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "seed": req.seed,
            "stop": req.stop,
        },
    }
    if finish in ("cancelled", "error"):  # the answer never reached the client in full
        event["delivered"] = False
    if error is not None:
        event["error"] = error
    if log_content:
        event["content"] = {"input": req.input_payload, "output": text}
    return event


def log_request(engine, req, text: str, finish: str, n_out: int, latency: float, error: str | None = None) -> None:
    """Add ``req``'s ``serve.request`` event to ``engine.request_log`` (None: nothing is logged). The one
    bookkeeping of the native engine (``Engine._log_request``) and the gateway (``GatewayEngine._log``):
    both hold ``request_log``, ``deployment``, ``base`` and ``settings``."""
    if engine.request_log is not None:
        engine.request_log.add(
            request_event(
                req,
                engine.deployment,
                engine.base.digest,
                text,
                finish,
                n_out,
                latency,
                error,
                engine.settings.log_content,
            )
        )


def spill(root: str | Path, type_: str, records: list[dict], reason: str) -> Path:
    """Write ``records`` (ledger event payloads of ``type_``) that could not reach the ledger to a new
    file ``ROOT/spill/TYPE-TIME-RAND.jsonl`` (atomically), log a warning naming it, and return its path."""
    path = Path(root) / "spill" / f"{type_}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}.jsonl"
    lines = [json.dumps({"type": type_, "data": r, "reason": reason}, sort_keys=True, default=str) for r in records]
    write_text(path, "\n".join(lines) + "\n")
    log.warning("%d %s event(s) could not be written to the ledger (%s): kept in %s", len(records), type_, reason, path)
    return path


class RequestLog:
    def __init__(self, ledger_path: str | Path, flush_s: float = 0.2, retry_s: float = 5.0):
        self._ledger = Ledger(ledger_path, None)  # its own connection: appends need no signing key
        # one attempt waits at most retry_s for a lock (the ledger's own default is 60 s)
        self._ledger.conn.execute(f"PRAGMA busy_timeout={int(max(retry_s, 0.05) * 1000)}")
        self._root = Path(ledger_path).parent
        self._flush_s = flush_s
        self._retry_s = retry_s
        self._pending: list[dict] = []
        self._writing: list[dict] = []  # the batch the writer holds right now
        self._added = 0  # events handed to us
        self._written = 0  # events in the ledger
        self._done = 0  # events written or spilled
        self.spilled = 0  # events that went to a spill file instead
        self.spill_files: list[Path] = []
        self._cond = threading.Condition()
        self._closing = False
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name="finetrace-request-log", daemon=True)
        self._thread.start()

    def add(self, data: dict) -> None:
        with self._cond:
            closed = self._abandoned or (self._closing and not self._thread.is_alive())
            if not closed:
                self._pending.append(data)
                self._added += 1
        if closed:  # a request answered after close (e.g. by a scheduler left behind on a forced exit)
            self._spill([data], "answered after the request log was closed")

    @property
    def written(self) -> int:
        return self._written

    def flush(self, timeout: float = 30.0) -> None:
        """Block (at most ``timeout`` s) until every event added before this call is written or spilled."""
        with self._cond:
            target = self._added
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._done >= target or not self._thread.is_alive(), timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is left, waiting at most ``timeout`` s; spill whatever is still unwritten then."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():  # stuck in a ledger call: take what it holds and leave it behind
            with self._cond:
                self._abandoned = True
                left, self._pending = self._writing + self._pending, []
            if left:
                self._spill(
                    left,
                    f"not written within the {timeout:g} s shutdown bound (the first "
                    f"{len(self._writing)} may also have reached the ledger)",
                )
            return  # the writer is a daemon thread; its connection goes with the process
        self._ledger.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._pending and not self._closing:
                    self._cond.wait(self._flush_s)
                batch, self._pending = self._pending, []
                self._writing = batch
                closing = self._closing
            if batch:
                self._write(batch)
            elif closing:
                return

    def _write(self, batch: list[dict]) -> None:
        delay, first_failure = 0.05, None
        while True:
            try:
                self._ledger.append_many(EVENT, batch)  # one transaction for the whole batch
                with self._cond:
                    self._written += len(batch)
                break
            except Exception as exc:
                first_failure = first_failure or time.monotonic()
                if self._abandoned:
                    return  # close() has spilled this batch already
                if time.monotonic() - first_failure >= self._retry_s:
                    with self._cond:  # claim the batch: close() spills only what the writer still holds
                        if self._abandoned:
                            return
                        self._writing = []
                    self._spill(batch, f"ledger write failed for {self._retry_s:g} s: {exc}")
                    break
                log.warning("could not write %d serve.request events (%s); retrying", len(batch), exc)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        with self._cond:
            self._writing = []
            self._done += len(batch)
            self._cond.notify_all()

    def _spill(self, batch: list[dict], reason: str) -> None:
        try:
            path = spill(self._root, EVENT, batch, reason)
        except OSError:  # the disk is gone too: the log line is all that is left
            log.exception(
                "could not spill %d serve.request events either: %s",
                len(batch),
                [e.get("provenance_id") for e in batch],
            )
            return
        with self._cond:
            self.spilled += len(batch)
            self.spill_files.append(path)
