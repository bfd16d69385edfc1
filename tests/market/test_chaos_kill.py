"""SIGKILL at seeded points of `publish` and `pull` (10 each, one per slice of the write events, so every
write window is hit), each followed by `verify`, a check that nothing partial is visible, and a resumed
run that completes and leaves no debris (registry staging, upload rows, `cache/.pull-*`)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from finetrace.errors import NotFoundError
from finetrace.ledger import verify_workspace
from finetrace.market import client, db
from finetrace.market.registry import Settings
from finetrace.market.server import BackgroundServer
from finetrace.workspace import Workspace

SEED, POINTS = 18, 10
CHILD = Path(__file__).with_name("chaos_child.py")
REF = "acme/chaos@1.0"


def kill_points(total: int, n: int = POINTS, seed: int = SEED) -> list[int]:
    """One seeded point in each of ``n`` equal slices of events 1..total (all of them if fewer)."""
    if total <= n:
        return list(range(1, total + 1))
    rng = random.Random(seed)
    edges = [1 + i * total // n for i in range(n + 1)]
    return [rng.randrange(edges[i], edges[i + 1]) for i in range(n)]


class Child:
    """The forking child (``chaos_child.py``): ``run(...) -> (exit status, events)``, one fork per call."""

    def __init__(self):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def run(self, *args) -> tuple[int, int]:
        self.proc.stdin.write(" ".join(map(str, args)) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the chaos child died"
        code, count = line.split()
        return int(code), int(count)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def child():
    """One forking child for the module (it forks per kill point, so runs share nothing but the imports)."""
    c = Child()
    yield c
    c.close()


def _registry(tmp: Path):
    tmp.mkdir(parents=True)
    srv = BackgroundServer(Settings(db_url=f"sqlite:///{tmp / 'registry.db'}", store=str(tmp / "store")))
    srv.__enter__()
    srv.token = srv.registry.add_user("acme")
    return srv


def _close(srv) -> None:
    srv.__exit__(None, None, None)
    srv.registry.close()


def _verified(srv) -> None:
    info = srv.registry.version("acme", "chaos", "1.0")
    assert srv.registry.badge(info)["level"] == "verified"
    assert all(srv.registry.store.has(f["digest"]) for f in info["manifest"]["files"])


def _no_staging(srv) -> None:
    staging = srv.registry.staging
    assert not staging.exists() or not [p for p in staging.rglob("*") if p.is_file()]
    with srv.registry.Session() as s:
        assert s.query(db.Upload).count() == 0


def _ok(ws_root: Path) -> None:
    ws = Workspace.open(ws_root)
    rep = verify_workspace(ws)
    ws.close()
    assert rep.ok, rep.problems


@pytest.mark.slow
def test_sigkill_during_publish(market, tmp_path, child):
    client.build_package(market.pub, "legal-lora", REF)  # warm the caches: every round takes the same path
    srv = _registry(tmp_path / "dry")
    code, total = child.run("publish", market.pub.root, srv.url, srv.token, REF, 0)
    _close(srv)
    assert code == 0
    points = kill_points(total)
    assert len(points) == POINTS and total >= 20, total
    for i, point in enumerate(points):
        srv = _registry(tmp_path / f"r{i}")
        try:
            assert child.run("publish", market.pub.root, srv.url, srv.token, REF, point)[0] == -signal.SIGKILL, point
            _ok(market.pub.root)
            try:  # nothing partial: absent, or published whole and verifiable
                _verified(srv)
            except NotFoundError:
                pass
            res = client.publish(market.pub, "legal-lora", REF, srv.url, srv.token)
            assert res["status"] in ("published", "exists"), (point, res)
            _verified(srv)
            _no_staging(srv)
            _ok(market.pub.root)
        finally:
            _close(srv)


@pytest.mark.slow
def test_sigkill_during_pull(market, tmp_path, child):
    srv = _registry(tmp_path / "registry")
    try:
        client.publish(market.pub, "legal-lora", REF, srv.url, srv.token)
        key = market.pub.keys.key_id
        template = tmp_path / "buyer-template"
        shutil.copytree(market.buyer.root, template)
        dry_root = tmp_path / "dry"
        shutil.copytree(template, dry_root)
        code, total = child.run("pull", dry_root, srv.url, key, REF, 0)
        assert code == 0
        points = kill_points(total)
        assert len(points) == POINTS and total >= 20, total
        for i, point in enumerate(points):
            root = tmp_path / f"buyer{i}"
            shutil.copytree(template, root)
            assert child.run("pull", root, srv.url, key, REF, point)[0] == -signal.SIGKILL, point
            _ok(root)
            ws = Workspace.open(root)
            try:
                seen = ws.ledger.resolve("acme/chaos")
                assert seen.digest == market.adapter.digest  # visible only whole (verify checked its files)
            except NotFoundError:
                pass
            art = client.pull(ws, REF, srv.url, trust_keys=[key])
            assert art.digest == market.adapter.digest
            assert not list((root / "cache").glob(".pull-*")), point
            ws.close()
            _ok(root)
    finally:
        _close(srv)
