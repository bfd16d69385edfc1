"""What every finetrace HTTP face shares: the bearer-token parser and a uvicorn server in a thread.

The serving gateway (``serve/``), the marketplace registry (``market/server.py``) and the audit console
(``web/``) read ``Authorization: Bearer TOKEN`` with :func:`bearer_token`; tests, benchmarks and the
pipeline's deploy stage run an app with :class:`BackgroundServer`, which binds 127.0.0.1 on a port the
OS chooses (never a fixed one) before starting, so parallel runs cannot collide::

    with BackgroundServer(uvicorn.Server(uvicorn.Config(app))) as srv:
        httpx.get(srv.url + "/health")
"""

from __future__ import annotations

import socket
import threading
import time


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header value (scheme case-insensitive), else None."""
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6); OSError when the address is not usable."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


class BackgroundServer:
    """A uvicorn ``server`` on a free 127.0.0.1 port in a daemon thread; ``url`` is its address.

    ``start`` returns once uvicorn is accepting (RuntimeError naming ``what`` if it does not within
    ``start_timeout`` s); ``stop`` asks it to exit and waits up to ``stop_timeout`` s.
    """

    what = "the server"

    def __init__(self, server, name: str = "finetrace-http", start_timeout: float = 60, stop_timeout: float = 120):
        self.server, self.start_timeout, self.stop_timeout = server, start_timeout, stop_timeout
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name=name, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float | None = None):
        self.thread.start()
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.what} did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float | None = None) -> None:
        self.server.should_exit = True
        self.thread.join(self.stop_timeout if timeout is None else timeout)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()
