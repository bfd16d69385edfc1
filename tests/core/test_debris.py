"""Crash debris: runs of dead processes marked interrupted on the next start, their scratch deleted, what
live processes own kept, and `finetrace gc` for what the automatic clean-up leaves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

from finetrace import debris
from finetrace.workspace import Workspace

WRITER = textwrap.dedent("""
    import sys, time
    from finetrace.debris import scratch_prefix
    from finetrace.workspace import Workspace
    ws = Workspace.open(sys.argv[1])
    root = ws.root
    with ws.ledger.run("import", config={"who": sys.argv[2]}) as run:
        (root / "cache" / (scratch_prefix(root, "import-") + "x")).mkdir(parents=True)
        (root / "cache" / (scratch_prefix(root, ".train-") + "y")).mkdir(parents=True)
        (root / "cache" / (scratch_prefix(root, "import-") + "x") / "rows.parquet").write_bytes(b"r" * 1000)
        (root / "objects" / "tmp").mkdir(parents=True, exist_ok=True)
        (root / "objects" / "tmp" / (scratch_prefix(root) + "z.part")).write_bytes(b"p" * 500)
        print(run.id, flush=True)
        time.sleep(60)
""")


def start_writer(root, who: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), who], stdout=subprocess.PIPE, text=True)
    run_id = proc.stdout.readline().strip()
    assert run_id.startswith("import-"), run_id
    return proc, run_id


def scratch(root) -> list[str]:
    return sorted(
        p.name for pattern in ("cache/import-*", "cache/.train-*", "objects/tmp/*.part") for p in root.glob(pattern)
    )


def test_dead_runs_are_marked_and_their_scratch_deleted_live_ones_kept(workspace):
    root = workspace.root
    dead, dead_run = start_writer(root, "dead")
    live, live_run = start_writer(root, "live")
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait(timeout=10)
        assert len(scratch(root)) == 6
        ws = Workspace.open(root)  # the next start of any command
        assert ws.ledger.get_run(dead_run).status == "interrupted"
        assert "died without finishing" in ws.ledger.get_run(dead_run).error
        assert ws.ledger.get_run(live_run).status == "running"  # its process lives: untouched
        left = scratch(root)
        assert len(left) == 3 and all(
            debris._TOKEN.match(n).group(1) in open(root / "locks" / "runs" / live_run).read() for n in left
        )
        assert len(list((root / "locks").glob("*.lock"))) == 1  # the live writer's (the dead one's is gone)
        size = ws.ledger.size()
        Workspace.open(root)  # idempotent: a second start marks nothing twice
        assert ws.ledger.size() == size
    finally:
        live.kill()
        live.wait(timeout=10)
    Workspace.open(root)
    assert ws.ledger.get_run(live_run).status == "interrupted" and scratch(root) == []
    assert not any((root / "locks" / "runs").iterdir())


def test_a_run_in_this_process_is_alive(workspace):
    with workspace.ledger.run("import", config={}) as run:
        Workspace.open(workspace.root)
        assert workspace.ledger.get_run(run.id).status == "running"
    assert workspace.ledger.get_run(run.id).status == "succeeded"
    assert not (workspace.root / "locks" / "runs" / run.id).exists()


def test_gc_removes_legacy_debris_and_reports(workspace, capsys):
    from finetrace.cli import main

    root = workspace.root
    (root / "cache" / "import-legacy123").mkdir()  # written before lock files: no token
    (root / "cache" / "import-legacy123" / "sketch.u8").write_bytes(b"s" * 2048)
    (root / "objects" / "tmp").mkdir(exist_ok=True)
    (root / "objects" / "tmp" / "tmpabc.part").write_bytes(b"p" * 100)
    (root / "cache" / "keep-me.txt").write_text("not scratch")
    # a "running" run with no lock file (started by an older finetrace, or on another machine)
    workspace.ledger.append(
        "run.started", {"id": "train-legacy", "kind": "train", "config": {}, "inputs": [], "environment": {}}
    )
    Workspace.open(root)
    assert (root / "cache" / "import-legacy123").is_dir()  # the automatic clean-up leaves token-less entries

    assert main(["-w", str(root), "gc", "--dry-run", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["bytes_freed"] == 2148 and len(rep["removed"]) == 2 and rep["unowned"] == ["train-legacy"]
    assert (root / "cache" / "import-legacy123").is_dir()  # dry run: nothing changed
    assert main(["-w", str(root), "gc"]) == 0
    out = capsys.readouterr().out
    assert "delete: 2 scratch entries, 2,148 bytes" in out and "run train-legacy is 'running' with no lock" in out
    assert not (root / "cache" / "import-legacy123").exists() and (root / "cache" / "keep-me.txt").is_file()
    assert main(["-w", str(root), "verify"]) == 0


def test_lock_files_are_per_process_and_released_at_death(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    tok = debris.token(ws.root)
    assert debris.token(ws.root) == tok and debris.alive(ws.root, tok)
    code = (
        f"from finetrace import debris; print(debris.token({str(ws.root)!r}), flush=True); import time; time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    other = proc.stdout.readline().strip()
    try:
        assert other != tok and debris.alive(ws.root, other)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert not debris.alive(ws.root, other)
    debris.reclaim(ws)
    assert not (ws.root / "locks" / f"{other}.lock").exists() and (ws.root / "locks" / f"{tok}.lock").exists()
