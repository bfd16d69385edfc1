"""Bounded shutdown: a drain with a deadline (the rest answered 503 `shutting_down`), a request log that
never waits on a sick ledger without a bound and records what it could not write, a second signal
recorded as an interruption, a failed bind recorded as a failed deploy."""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import threading
import time

import httpx
import pytest

from finetrace.serve.engine import Engine
from finetrace.serve.requestlog import RequestLog
from finetrace.serve.server import BackgroundServer
from finetrace.serve.settings import ServeSettings

from .serve_support import hold_scheduler, logged_events

BODY = {"model": "tiny", "prompt": "hello", "max_tokens": 400, "temperature": 0}


def _post_async(srv, out: list, body=BODY) -> threading.Thread:
    def go():
        out.append(httpx.post(srv.base_url + "/completions", json=body, timeout=60))

    t = threading.Thread(target=go)
    t.start()
    return t


def _wait(cond, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.mark.slow
def test_drain_is_bounded_and_the_rest_get_503(served_ws):
    """Two requests decoding and one queued when the shutdown starts; nothing finishes within drain_s:
    all three are answered 503 `shutting_down` (OpenAI error shape), logged as not delivered, and the
    server is gone soon after the bound."""
    settings = ServeSettings(max_batch=2, drain_s=0.5)
    eng = Engine(served_ws, "tiny", [], settings)
    srv = BackgroundServer(eng, settings).start()
    out: list = []
    threads = [_post_async(srv, out) for _ in range(2)]
    _wait(lambda: eng.stats()["active"] == 2, what="two rows decoding")
    with hold_scheduler(eng):  # they stay unfinished past the deadline
        threads.append(_post_async(srv, out))
        _wait(lambda: eng.stats()["queued"] == 1, what="one queued")
        deployment = eng.deployment
        t0 = time.monotonic()
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        _wait(
            lambda: eng._drain_deadline is not None and time.monotonic() > eng._drain_deadline + 0.05,
            what="the drain deadline",
        )
    stopper.join(30)
    [t.join(30) for t in threads]
    assert not stopper.is_alive() and time.monotonic() - t0 < settings.drain_s + 5
    assert [r.status_code for r in out] == [503] * 3
    for r in out:
        err = r.json()["error"]
        assert err["code"] == "shutting_down" and err["type"] == "server_error" and r.headers["retry-after"]
    events = logged_events(served_ws, deployment)
    assert len(events) == 3 and all(e["finish_reason"] == "error" and e["delivered"] is False for e in events)
    assert served_ws.ledger.get_run(deployment).status == "succeeded"


def test_second_signal_records_the_deploy_as_interrupted(served_ws):
    settings = ServeSettings(drain_s=60)
    eng = Engine(served_ws, "tiny", [], settings)
    srv = BackgroundServer(eng, settings).start()
    out: list = []
    with hold_scheduler(eng):  # a request that will not finish by itself while we signal
        t = _post_async(srv, out)
        _wait(lambda: eng.stats()["queued"] == 1, what="one queued")
        deployment = eng.deployment
        t0 = time.monotonic()
        srv.server.handle_exit(signal.SIGTERM, None)
        _wait(lambda: eng._stopping, what="the drain to start")
        srv.server.handle_exit(signal.SIGTERM, None)
        srv.thread.join(20)
    assert not srv.thread.is_alive() and time.monotonic() - t0 < 15
    t.join(30)
    run = served_ws.ledger.get_run(deployment)
    assert run.status == "interrupted" and "second signal" in run.error


def _lock(ws) -> sqlite3.Connection:
    """Another process's view: a connection holding the ledger's write lock."""
    conn = sqlite3.connect(ws.ledger.path, isolation_level=None, timeout=5)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def _spilled(ws) -> list[dict]:
    return [
        json.loads(ln)
        for p in sorted((ws.root / "spill").glob("serve.request-*.jsonl"))
        for ln in p.read_text().splitlines()
    ]


def test_request_log_close_is_bounded_on_a_locked_ledger(workspace, caplog):
    log = RequestLog(workspace.ledger.path, flush_s=0.01, retry_s=30)
    lock = _lock(workspace)
    try:
        log.add({"provenance_id": "ftp-locked", "deployment": "d"})
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, "finetrace.serve"):
            log.close(timeout=0.5)
        assert time.monotonic() - t0 < 3
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert [r["data"]["provenance_id"] for r in _spilled(workspace)] == ["ftp-locked"]
    assert "spill" in caplog.text and "could not be written" in caplog.text


def test_failing_ledger_write_is_spilled_not_retried_forever(workspace):
    conn = sqlite3.connect(workspace.ledger.path, isolation_level=None)
    conn.execute("CREATE TRIGGER broken BEFORE INSERT ON entries BEGIN SELECT RAISE(ABORT, 'disk on fire'); END")
    conn.close()
    size = workspace.ledger.size()
    log = RequestLog(workspace.ledger.path, flush_s=0.01, retry_s=0.3)
    for i in range(3):
        log.add({"provenance_id": f"ftp-{i}", "deployment": "d"})
    log.flush(timeout=10)
    assert log.spilled == 3 and log.written == 0
    log.add({"provenance_id": "ftp-3", "deployment": "d"})  # the writer is still alive and still bounded
    t0 = time.monotonic()
    log.close(timeout=10)
    assert time.monotonic() - t0 < 3 and log.spilled == 4
    rows = _spilled(workspace)
    assert sorted(r["data"]["provenance_id"] for r in rows) == [f"ftp-{i}" for i in range(4)]
    assert all("disk on fire" in r["reason"] for r in rows) and workspace.ledger.size() == size


def test_a_batch_spilled_by_the_writer_as_close_gives_up_is_spilled_once(workspace, monkeypatch):
    """The writer's retries run out at the moment close() stops waiting: the batch lands in one spill file."""
    conn = sqlite3.connect(workspace.ledger.path, isolation_level=None)
    conn.execute("CREATE TRIGGER broken BEFORE INSERT ON entries BEGIN SELECT RAISE(ABORT, 'disk on fire'); END")
    conn.close()
    log = RequestLog(workspace.ledger.path, flush_s=0.01, retry_s=0.05)
    entered, release = threading.Event(), threading.Event()
    real_spill = RequestLog._spill

    def slow_spill(self, batch, reason):
        if threading.current_thread() is self._thread:  # the writer, holding the batch it failed to write
            entered.set()
            release.wait(10)
        real_spill(self, batch, reason)

    monkeypatch.setattr(RequestLog, "_spill", slow_spill)
    for i in range(3):
        log.add({"provenance_id": f"ftp-{i}", "deployment": "d"})
    assert entered.wait(10)
    log.close(timeout=0.1)  # gives up on the writer, which is still inside its spill
    release.set()
    log._thread.join(10)
    assert sorted(r["data"]["provenance_id"] for r in _spilled(workspace)) == ["ftp-0", "ftp-1", "ftp-2"]


def test_failed_bind_is_a_failed_deploy(served_ws, capsys):
    from finetrace.cli import main

    before = {r.id for r in served_ws.ledger.runs("deploy")}
    code = main(
        ["--workspace", str(served_ws.root), "serve", "--base", "tiny", "--host", "192.0.2.1", "--port", "8"]
    )  # TEST-NET-1: never an address of this machine
    assert code == 2
    assert "cannot listen on 192.0.2.1:8" in capsys.readouterr().err
    new = [r for r in served_ws.ledger.runs("deploy") if r.id not in before]
    assert len(new) == 1 and new[0].status == "failed" and "cannot listen" in new[0].error


def test_a_failing_block_records_a_failed_deploy(served_ws):
    """What the pipeline's deploy stage relies on: a BackgroundServer block that raises is a failed deploy."""
    eng = Engine(served_ws, "tiny", [], ServeSettings())
    try:
        with BackgroundServer(eng) as srv:
            deployment = eng.deployment
            assert httpx.get(srv.url + "/health").status_code == 200
            raise RuntimeError("the question could not be asked")
    except RuntimeError:
        pass
    run = served_ws.ledger.get_run(deployment)
    assert run.status == "failed" and "could not be asked" in run.error
