"""Stopping an engine within a bound, and closing its ``deploy`` run: succeeded, ``interrupted`` (a second signal) or
failed (e.g. the port could not be bound), with the engine's request counts as its metrics.

The final ledger writes wait at most ``ledger_timeout_s`` for a lock; if they cannot be made, the
``run.finished`` record goes to a spill file (see requestlog.py) instead of holding the process.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack

from .requestlog import spill

log = logging.getLogger("finetrace.serve")


def stop_engine(engine, timeout: float | None, interrupted: bool, error: BaseException | None) -> None:
    """``Engine.stop``: drain (``begin_stop``), close the request log, close the deploy run. Every wait has a
    bound: ``timeout`` (default ``drain_s``) for the requests, ``ledger_timeout_s`` per ledger write."""
    s = engine.settings
    engine.begin_stop(s.drain_s if timeout is None else timeout)
    if engine._thread is not None:
        engine._thread.join(max(0.0, engine._drain_deadline - time.monotonic()) + (1 if interrupted else 5))
        if engine._thread.is_alive():
            log.warning("the scheduler did not stop in time; leaving it behind")
        engine._thread = None
    if engine.request_log is not None:
        engine.request_log.close(s.ledger_timeout_s + 1)
    if engine.deploy_run is not None:
        close_deploy(engine, interrupted, error)


def close_deploy(engine, interrupted: bool, error: BaseException | None) -> None:
    """Close ``engine.deploy_run`` (entered on ``engine._exit``); never raises for a ledger failure."""
    run, logged, m = engine.deploy_run, engine.request_log, engine.metrics
    run.metrics.update(
        {
            "requests": int(sum(m.requests.values())),
            "rejected": m.rejected,
            "completion_tokens": int(sum(v for (_, k), v in m.tokens.items() if k == "completion")),
            "unlogged": logged.spilled if logged is not None else 0,
        }
    )
    if interrupted:
        error = KeyboardInterrupt("a second signal: stopped without draining")
    exc_info = (type(error), error, error.__traceback__) if error is not None else (None, None, None)
    ws = engine.ws
    with engine.ledger_lock:
        conn = ws.ledger.conn  # bound the final writes: a locked ledger must not hold the exit
        conn.execute(f"PRAGMA busy_timeout={int(engine.settings.ledger_timeout_s * 1000)}")
        try:
            engine._exit.__exit__(*exc_info)  # the ledger records interrupted / failed / succeeded, and signs
        except Exception as exc:
            status = "interrupted" if interrupted else ("failed" if error is not None else "succeeded")
            spill(
                ws.ledger.path.parent,
                "run.finished",
                [
                    {
                        "id": run.id,
                        "status": status,
                        "metrics": run.metrics,
                        "error": str(error) if error is not None else None,
                    }
                ],
                f"ledger write failed: {exc}",
            )
        finally:
            conn.execute("PRAGMA busy_timeout=60000")
            engine._exit = ExitStack()
    engine.deploy_run = None
