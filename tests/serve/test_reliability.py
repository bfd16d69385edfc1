"""Serving reliability: one bad request fails alone, bad input is a 400 (never a 500), a huge prompt does not
stall the event loop, a client that left is recorded as not served, 429 says when to retry.

Bad-input tests run in process (``api``: FastAPI's TestClient); the event-loop, disconnect and overload
tests cross a real socket (``server``, ``BackgroundServer`` on a free 127.0.0.1 port)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future

import httpx
import pytest

from finetrace.serve.engine import Engine
from finetrace.serve.request import GenRequest
from finetrace.serve.server import BackgroundServer
from finetrace.serve.settings import ServeSettings

from .serve_support import hold_scheduler, logged_events

MSG = [{"role": "user", "content": "What is the capital of France?"}]
LIMIT = 6 * 1024 * 1024


@pytest.fixture(scope="module")
def server(served_ws):
    settings = ServeSettings(max_batch=4, max_queue=8, max_request_bytes=LIMIT)
    eng = Engine(served_ws, "tiny", ["alpha@1"], settings)
    with BackgroundServer(eng, settings) as srv:
        srv.engine = eng
        yield srv


@pytest.fixture(scope="module")
def api(served_ws):
    """The same app in process (FastAPI's TestClient): for the tests that need no real socket."""
    from fastapi.testclient import TestClient

    from finetrace.serve.app import create_app

    settings = ServeSettings(max_batch=4, max_queue=8, max_request_bytes=LIMIT)
    with TestClient(create_app(Engine(served_ws, "tiny", ["alpha@1"], settings), settings)) as client:
        yield client


def _post(srv, path: str, body, timeout: float = 60) -> httpx.Response:
    """POST a JSON body to a BackgroundServer (a real socket) or to the in-process TestClient."""
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"content-type": "application/json"}
    if hasattr(srv, "post"):
        return srv.post("/v1" + path, content=data, headers=headers)
    return httpx.post(srv.base_url + path, content=data, headers=headers, timeout=timeout)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_huge_seed_is_refused_at_the_edge(api):
    body = {"model": "tiny", "messages": MSG, "max_tokens": 3, "temperature": 1, "seed": 2**70}
    err = _error(_post(api, "/chat/completions", body), 400)
    assert err["param"] == "seed" and err["type"] == "invalid_request_error"
    ok = _post(api, "/chat/completions", {**body, "seed": 2**64 - 1})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_a_request_failing_at_admission_fails_alone(served_ws):
    """A seed the generator refuses, past the edge: the request is answered (error) and logged, while the
    rows already decoding and the newcomers admitted with it finish in full."""
    settings = ServeSettings(max_batch=8)
    eng = Engine(served_ws, "tiny", [], settings)
    ids = eng.encode_text("hello there")
    futures: dict[str, Future] = {}

    def submit(name, **kw):
        fut: Future = Future()
        futures[name] = fut

        def on_event(kind, value):
            if kind == "done":
                fut.set_result(value)
            elif kind == "error":
                fut.set_exception(value)

        return eng.submit(GenRequest(ids, "tiny", on_event=on_event, **kw))

    eng.start()
    try:
        with hold_scheduler(eng):  # the two run together; then the bad one joins while they decode
            submit("run1", max_tokens=60, temperature=0)
            submit("run2", max_tokens=60, temperature=0.7, seed=3)
        deadline = time.monotonic() + 30
        while eng.stats()["active"] < 2 and not all(f.done() for f in futures.values()):
            assert time.monotonic() < deadline
            time.sleep(0.002)
        with hold_scheduler(eng):
            bad = submit("bad", max_tokens=5, temperature=1.0, seed=2**70)
            submit("new", max_tokens=5, temperature=0.5, seed=1)
        with pytest.raises(ValueError, match="Overflow"):
            futures["bad"].result(30)
        assert [futures[k].result(30).completion_tokens for k in ("run1", "run2", "new")] == [60, 60, 5]
        deployment = eng.deployment
    finally:
        eng.stop()
    events = {e["provenance_id"]: e for e in logged_events(served_ws, deployment)}
    assert len(events) == 4
    assert events[bad.provenance_id]["finish_reason"] == "error"
    assert events[bad.provenance_id]["delivered"] is False and "Overflow" in events[bad.provenance_id]["error"]


def test_retry_after_on_429(served_ws):
    settings = ServeSettings(max_queue=1)
    eng = Engine(served_ws, "tiny", [], settings)
    with BackgroundServer(eng, settings) as srv:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
        with hold_scheduler(eng):
            first = threading.Thread(target=_post, args=(srv, "/completions", body))
            first.start()
            deadline = time.monotonic() + 30
            while eng.stats()["queued"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.002)
            r = _post(srv, "/completions", body)
        first.join(30)
    assert _error(r, 429)["code"] == "queue_full"
    assert r.headers["retry-after"] == "1"


@pytest.mark.parametrize(
    "path,body,param",
    [
        (
            "/chat/completions",
            '{"model": "tiny", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
            "messages[0].content",
        ),
        ("/completions", '{"model": "tiny", "prompt": "\\udfff x"}', "prompt"),
        ("/completions", '{"model": "tiny\\ud800", "prompt": "x"}', "model"),
    ],
)
def test_lone_surrogate_is_a_400(api, path, body, param):
    err = _error(_post(api, path, body), 400)
    assert err["param"] == param and "Unicode" in err["message"]


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", True),
        ("max_tokens", "5"),
        ("max_tokens", 2.0),
        ("seed", False),
        ("stream", 1),
        ("temperature", True),
    ],
)
def test_strict_types(api, field, value):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 2, field: value}
    assert _error(_post(api, "/completions", body), 400)["param"] == field


def test_oversized_body_is_413(api):
    body = {"model": "tiny", "prompt": "x" * (LIMIT + 10)}
    err = _error(_post(api, "/completions", body), 413)
    assert err["code"] == "request_too_large" and str(LIMIT) in err["message"]


def test_big_prompt_is_tokenised_off_the_event_loop(server):
    """A 1 MB prompt takes the tokenizer ~1 s here; /health keeps answering meanwhile, and the prompt gets a
    400 naming the context length."""
    out: list = []
    big = threading.Thread(
        target=lambda: out.append(
            _post(
                server,
                "/chat/completions",
                {"model": "tiny", "messages": [{"role": "user", "content": "the supplier shall " * 60_000}]},
            )
        )
    )
    t0 = time.monotonic()
    big.start()
    latencies = []
    with httpx.Client(base_url=server.url, timeout=30) as cl:
        while big.is_alive():
            s = time.monotonic()
            assert cl.get("/health").status_code == 200
            latencies.append(time.monotonic() - s)
            time.sleep(0.02)
    elapsed = time.monotonic() - t0
    err = _error(out[0], 400)
    assert err["param"] == "max_tokens" and "context length 512" in err["message"]
    assert elapsed > 0.5, "the prompt was not big enough to measure anything"
    assert max(latencies) < 0.25 and len(latencies) >= 5, (elapsed, latencies)


def test_client_disconnect_is_recorded_as_not_delivered(served_ws, server):
    """A non-streaming client that gives up: its generation stops, and its record says not delivered."""
    eng = server.engine
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 499, "temperature": 0}
    with hold_scheduler(eng):  # it cannot finish before the client leaves
        with pytest.raises(httpx.ReadTimeout):
            _post(server, "/completions", body, timeout=0.3)
    deadline = time.monotonic() + 30
    while True:
        eng.request_log.flush()
        mine = [e for e in logged_events(served_ws, eng.deployment) if e["params"]["max_tokens"] == 499]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(mine) == 1
    assert mine[0]["finish_reason"] == "cancelled" and mine[0]["delivered"] is False
    assert mine[0]["completion_tokens"] < 499


def test_a_control_queued_before_a_request_runs_before_it(served_ws):
    """The race behind the flaky overload test: an idle scheduler waiting for a request took one that
    arrived just after a control (a hold, a hot load) and admitted it first, so max_queue + 1 got in."""
    eng = Engine(served_ws, "tiny", [], ServeSettings())
    ids = eng.encode_text("hello")
    eng.start()
    try:
        for _ in range(5):
            order: list[str] = []
            done: Future = Future()
            eng._controls.put((lambda: order.append("control"), Future()))  # noqa: B023  (run in this iteration)
            eng.submit(
                GenRequest(
                    ids,
                    "tiny",
                    max_tokens=1,
                    temperature=0,
                    on_event=lambda kind, value: (
                        order.append(kind),  # noqa: B023  (run in this iteration)
                        kind in ("done", "error") and done.set_result(kind),  # noqa: B023
                    ),
                )
            )
            assert done.result(30) == "done"
            assert order[0] == "control", order
    finally:
        eng.stop()
