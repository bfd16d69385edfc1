"""The shared HTTP pieces: one bearer-token parser, one background uvicorn server."""

from __future__ import annotations

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from finetrace.asgi import BackgroundServer, bearer_token


@pytest.mark.parametrize(
    "header, token",
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("BEARER x.y-z", "x.y-z"),
        ("Bearer ", None),
        ("Basic abc", None),
        ("Bearerabc", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token(header, token):
    assert bearer_token(header) == token


def test_background_servers_take_free_ports_and_stop():
    app = FastAPI()

    @app.get("/who")
    def who(request: Request):
        return {"token": bearer_token(request.headers.get("authorization"))}

    def server():
        return BackgroundServer(uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off")))

    with server() as a, server() as b:
        assert a.port != b.port
        for s in (a, b):
            got = httpx.get(s.url + "/who", headers={"Authorization": "Bearer t1"}, timeout=5)
            assert got.json() == {"token": "t1"}
    assert not a.thread.is_alive() and not b.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(a.url + "/who", timeout=2)
