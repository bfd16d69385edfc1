"""Running the app under uvicorn: in the foreground (``finetrace serve``) or in a thread (tests, benchmarks).

``BackgroundServer`` binds 127.0.0.1 on a free port chosen by the OS (never a fixed one) before
starting, so parallel test runs cannot collide. ``serve`` binds its host and port before the model
serves anything: an address that is not on this machine is a clean error and a *failed* deploy run.

Shutdown is bounded. On the first SIGTERM/SIGINT the port closes, new requests get 503
``shutting_down``, in-flight and queued ones have ``drain_s`` seconds to finish and are then answered
503 too; the request log and the deploy run are written within ``ledger_timeout_s`` (or spilled, see
requestlog.py). A second signal stops at once and records the deploy run as ``interrupted``.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from ..asgi import BackgroundServer as _BackgroundServer
from ..asgi import bind
from ..errors import InputError
from ..workspace import Workspace
from .app import create_app
from .engine import Engine
from .settings import ServeSettings

log = logging.getLogger("finetrace.serve")


def build_engine(
    ws: Workspace,
    base: str,
    adapters: list[str],
    settings: ServeSettings,
    engine: str = "native",
    upstream: str | None = None,
    upstream_key: str | None = None,
    threads: int = 2,
) -> Engine:
    """The one entry point that CLI, tests and the benchmark share: base + verified adapters, on the
    native engine or behind the gateway on llama.cpp / vLLM (``serve/engines``)."""
    from .engines import open_engine

    return open_engine(ws, base, adapters, settings, engine, upstream, upstream_key, threads)


class _Server(uvicorn.Server):
    """uvicorn with a bounded drain: the engine starts refusing and timing out work when the port
    closes (not after uvicorn's own wait), and a second signal of either kind forces the exit."""

    def __init__(self, config: uvicorn.Config, engine: Engine, drain_s: float):
        super().__init__(config)
        self.engine, self.drain_s = engine, drain_s

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit and sig in (signal.SIGINT, signal.SIGTERM):
            self.force_exit = True
            log.warning("second signal: stopping without draining")
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        self.engine.begin_stop(self.drain_s)
        await super().shutdown(sockets)
        if self.force_exit:  # uvicorn skips the app's lifespan shutdown: record the interruption here
            await asyncio.to_thread(self.engine.stop, 0, interrupted=True)


def _config(engine: Engine, settings: ServeSettings, log_level: str) -> uvicorn.Config:
    # uvicorn's own wait is only a backstop: the engine answers everything by drain_s
    return uvicorn.Config(
        create_app(engine, settings),
        log_level=log_level,
        limit_concurrency=None,
        timeout_graceful_shutdown=settings.drain_s + 5,
    )


def serve(engine: Engine, settings: ServeSettings) -> None:
    """Serve in the foreground until SIGINT/SIGTERM (see the module docstring for the shutdown)."""
    try:
        sock = bind(settings.host, settings.port)
    except OSError as exc:
        err = InputError(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}",
            hint="give --host an address of this machine (127.0.0.1, 0.0.0.0) and a free --port",
            field="--host",
        )
        engine.start()  # record the attempt: a deploy run that failed, with the reason
        engine.stop(0, error=err)
        raise err from None
    port = sock.getsockname()[1]
    log.info("finetrace serve listening on http://%s:%d", settings.host, port)
    server = _Server(_config(engine, settings, "info"), engine, settings.drain_s)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


class BackgroundServer(_BackgroundServer):
    """``with BackgroundServer(engine, settings) as srv: srv.base_url`` -> ``http://127.0.0.1:PORT/v1``."""

    def __init__(self, engine: Engine, settings: ServeSettings | None = None):
        self.settings, self.engine = settings or engine.settings, engine
        super().__init__(
            _Server(_config(engine, self.settings, "warning"), engine, self.settings.drain_s), name="finetrace-uvicorn"
        )

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:  # the block failed: so did the deployment (a Ctrl-C interrupted it)
            interrupted = isinstance(exc, KeyboardInterrupt)
            self.engine.stop(0, interrupted=interrupted, error=None if interrupted else exc)
        self.stop()
