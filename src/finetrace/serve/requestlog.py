"""The request log: every answered request becomes a ``serve.request`` ledger event, written off the hot path.

Request threads hand events to ``RequestLog.add`` (a list append under a lock); a background writer
appends them every ``flush_s`` seconds in ONE ledger transaction per batch, on its own SQLite connection,
so logging never serialises decoding. ``flush()`` waits until everything added so far is in the ledger
(used before resolving a provenance id) and ``close()`` flushes the rest on shutdown, so a graceful
shutdown loses no event. A failed write is retried; the events stay in memory until it succeeds.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from ..ledger.log import Ledger

log = logging.getLogger("finetrace.serve")

EVENT = "serve.request"


class RequestLog:
    def __init__(self, ledger_path: str | Path, flush_s: float = 0.2):
        self._ledger = Ledger(ledger_path, None)  # its own connection: appends need no signing key
        self._flush_s = flush_s
        self._pending: list[dict] = []
        self._added = 0    # events handed to us
        self._written = 0  # events in the ledger
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="finetrace-request-log", daemon=True)
        self._thread.start()

    def add(self, data: dict) -> None:
        with self._cond:
            if self._closing and not self._thread.is_alive():
                raise RuntimeError("request log is closed")
            self._pending.append(data)
            self._added += 1

    @property
    def written(self) -> int:
        return self._written

    def flush(self, timeout: float = 30.0) -> None:
        """Block until every event added before this call is in the ledger."""
        with self._cond:
            target = self._added
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._written >= target or not self._thread.is_alive(), timeout)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        self._ledger.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._pending and not self._closing:
                    self._cond.wait(self._flush_s)
                batch, self._pending = self._pending, []
                closing = self._closing
            if batch:
                self._write(batch)
            elif closing:
                return

    def _write(self, batch: list[dict]) -> None:
        delay = 0.05
        while True:
            try:
                self._ledger.append_many(EVENT, batch)  # one transaction for the whole batch
                break
            except Exception:  # keep the events and retry: never drop a request record
                log.exception("could not write %d serve.request events; retrying", len(batch))
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        with self._cond:
            self._written += len(batch)
            self._cond.notify_all()
