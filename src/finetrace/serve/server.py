"""Running the app under uvicorn: in the foreground (``finetrace serve``) or in a thread (tests, benchmarks).

``BackgroundServer`` binds 127.0.0.1 on a free port chosen by the OS (never a fixed one) before
starting, so parallel test runs cannot collide. Shutdown is graceful in both cases: uvicorn stops
accepting connections and waits for in-flight requests, then the app's lifespan stops the engine, which
finishes what it still holds and flushes the request log.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from ..workspace import Workspace
from .app import create_app
from .engine import Engine
from .settings import ServeSettings

log = logging.getLogger("finetrace.serve")


def build_engine(ws: Workspace, base: str, adapters: list[str], settings: ServeSettings) -> Engine:
    """The one entry point that CLI, tests and the benchmark share: base + verified adapters."""
    return Engine(ws, base, list(adapters), settings)


def serve(engine: Engine, settings: ServeSettings, graceful_s: float = 60) -> None:
    """Serve in the foreground until SIGINT/SIGTERM."""
    import uvicorn

    uvicorn.run(create_app(engine, settings), host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=graceful_s)


class BackgroundServer:
    """``with BackgroundServer(engine, settings) as srv: srv.base_url`` -> ``http://127.0.0.1:PORT/v1``."""

    def __init__(self, engine: Engine, settings: ServeSettings | None = None, graceful_s: float = 60):
        import uvicorn

        self.settings = settings or engine.settings
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(create_app(engine, self.settings), log_level="warning",
                                timeout_graceful_shutdown=graceful_s, limit_concurrency=None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="finetrace-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def start(self, timeout: float = 60) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 120) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
