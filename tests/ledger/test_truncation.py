"""Truncation, re-signed rewrites, a damaged ledger.db and edited report copies: what verify catches, and
what it says it could not check without a checkpoint kept outside the workspace."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3

import pytest

from finetrace.errors import IntegrityError
from finetrace.ledger import merkle, verify_workspace
from finetrace.ledger.log import Checkpoint, now
from finetrace.workspace import Workspace


def _grow(ws, n=6):
    for i in range(n):
        with ws.ledger.run("import", config={"i": i}) as run:
            run.output("dataset", ws.store.put_bytes(f"rows {i}".encode()), name="d")
        ws.checkpoint()


def _sql(ws, *statements):
    conn = sqlite3.connect(ws.root / "ledger.db")
    for sql, args in statements:
        conn.execute(sql, args)
    conn.commit()
    conn.close()


def _reopen(ws):
    ws.close()
    return Workspace.open(ws.root)


def _truncate(ws, keep: int):
    """The attack of the probe: drop the last entries, their checkpoints and witness.json, rebuild the index."""
    _sql(ws, ("DELETE FROM entries WHERE seq >= ?", (keep,)), ("DELETE FROM checkpoints WHERE size > ?", (keep,)))
    (ws.root / "witness.json").unlink()
    ws = _reopen(ws)
    ws.ledger.rebuild_index()
    return ws


def _status(rep, name):
    return next(g["status"] for g in rep.guarantees if g["guarantee"] == name)


def test_truncation_with_checkpoints_and_witness_removed_is_caught(workspace):
    _grow(workspace)
    keep = workspace.ledger.size() - 5
    ws = _truncate(workspace, keep)
    rep = verify_workspace(ws)
    assert not rep.ok
    assert any("witness file witness.json is missing" in p for p in rep.problems), rep.problems
    assert any(f"external checkpoint at size {keep + 5}" in p and "truncated" in p for p in rep.problems), rep.problems
    assert _status(rep, "external checkpoint") == "failed"
    # and the truncated log cannot refresh the evidence against itself
    with pytest.raises(IntegrityError, match="no longer extends the checkpoint"):
        ws.checkpoint()
    # with the external witness gone too, the missing witness.json is still a finding
    ws.witness_path.unlink()
    rep = verify_workspace(ws)
    assert not rep.ok and _status(rep, "external checkpoint") == "not checked"
    assert "witness file witness.json is missing" in rep.problems[0]
    ws.close()


def test_a_replayed_older_witness_needs_an_external_checkpoint(workspace, tmp_path):
    _grow(workspace)
    exported = tmp_path / "auditor.json"
    exported.write_text(json.dumps(workspace.checkpoint().to_dict()))
    keep = workspace.ledger.size() - 4
    old = next(c for c in workspace.ledger.checkpoints() if c.size <= keep and c.size > keep - 3)
    ws = _truncate(workspace, old.size)
    (ws.root / "witness.json").write_text(json.dumps(old.to_dict()))  # an old signed checkpoint: no key needed
    ws.witness_path.unlink()
    rep = verify_workspace(ws)
    # the stated limit: from inside the workspace alone this rollback is indistinguishable from an old log
    assert rep.ok, rep.problems
    assert _status(rep, "external checkpoint") == "not checked"
    rep = verify_workspace(ws, [exported])
    assert not rep.ok and "truncated" in rep.problems[0] and str(exported) in rep.problems[0]
    ws.close()


def _resign_rewrite(ws, seq: int):
    """An insider with the workspace key edits entry ``seq``, recomputes every leaf and re-signs."""
    conn = sqlite3.connect(ws.root / "ledger.db")
    body = conn.execute("SELECT body FROM entries WHERE seq=?", (seq,)).fetchone()[0]
    doc = json.loads(body)
    doc["data"]["config"] = {"i": 999}
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    conn.execute("UPDATE entries SET body=?, leaf=? WHERE seq=?", (raw, merkle.leaf_hash(raw), seq))
    leaves = [bytes(r[0]) for r in conn.execute("SELECT leaf FROM entries ORDER BY seq")]
    keys = ws.keys
    unsigned = Checkpoint(len(leaves), merkle.root(leaves).hex(), now(), keys.key_id, "")
    cp = Checkpoint(unsigned.size, unsigned.root, unsigned.time, keys.key_id, keys.sign(unsigned.message()))
    conn.execute("DELETE FROM checkpoints")
    conn.execute("INSERT INTO checkpoints VALUES (?,?,?,?,?)", (cp.size, cp.root, cp.time, cp.key_id, cp.signature))
    conn.commit()
    conn.close()
    (ws.root / "witness.json").write_text(json.dumps(cp.to_dict()))
    ws = _reopen(ws)
    ws.ledger.rebuild_index()
    return ws


def test_a_rewrite_resigned_with_the_workspace_key_is_caught_by_the_external_checkpoint(workspace, tmp_path):
    _grow(workspace)
    exported = tmp_path / "auditor.json"
    exported.write_text(json.dumps(workspace.checkpoint().to_dict()))
    seq = next(e.seq for e in workspace.ledger.entries(type="run.started"))
    ws = _resign_rewrite(workspace, seq)
    rep = verify_workspace(ws)  # the default external witness, outside the workspace folder
    assert not rep.ok and "external checkpoint" in rep.problems[0] and "external witness" in rep.problems[0]
    assert f"entry {seq} differs" in rep.problems[0] or "rewritten" in rep.problems[0]
    rep = verify_workspace(ws, [exported])
    assert sum("external checkpoint" in p for p in rep.problems) == 2
    ws.witness_path.unlink()
    rep = verify_workspace(ws)
    assert rep.ok and _status(rep, "external checkpoint") == "not checked"  # the stated limit, reported
    ws.close()


def test_witness_defaults_outside_the_workspace_and_can_be_configured(tmp_path, monkeypatch):
    ws = Workspace.init(tmp_path / "a", witness=tmp_path / "auditor" / "a.json")
    assert ws.witness_path == tmp_path / "auditor" / "a.json"
    assert json.loads(ws.witness_path.read_text())["checkpoint"]["size"] == 1
    ws.close()
    b = Workspace.init(tmp_path / "b")
    assert not b.witness_path.is_relative_to(b.root)
    assert b.witness_path.is_file()
    monkeypatch.setenv("FINETRACE_WITNESS", str(tmp_path / "env.json"))
    b.checkpoint()
    b.ledger.append("test.event", {})
    b.close()
    b = Workspace.open(tmp_path / "b")
    b.checkpoint()
    assert json.loads((tmp_path / "env.json").read_text())["checkpoint"]["size"] == 2
    b.close()
    monkeypatch.delenv("FINETRACE_WITNESS")
    from finetrace.cli import main

    assert main(["init", str(tmp_path / "c"), "--witness", str(tmp_path / "auditor" / "c.json")]) == 0
    assert json.loads((tmp_path / "auditor" / "c.json").read_text())["workspace"] == str(tmp_path / "c")


def _cli(capsys, *args):
    from finetrace.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_half_truncated_ledger_db_is_named_not_a_traceback(workspace, capsys):
    _grow(workspace, 3)
    workspace.close()
    db = workspace.root / "ledger.db"
    os.truncate(db, db.stat().st_size // 2)
    with pytest.raises(IntegrityError, match=r"ledger database .*ledger.db is damaged \(\d+ bytes; SQLite"):
        Workspace.open(workspace.root)
    code, _, err = _cli(capsys, "--workspace", str(workspace.root), "verify")
    assert code == 3 and err.count("\n") == 1 and "ledger.db is damaged" in err, err


def test_edited_report_copies_are_caught(workspace):
    _grow(workspace, 1)
    art = workspace.ledger.resolve("d")
    dest = workspace.root / "reports" / "demo" / "documents"
    dest.mkdir(parents=True)
    shutil.copyfile(workspace.store.path(art.digest), dest / "card.md")
    rep = verify_workspace(workspace)
    assert rep.ok and rep.checks["report_copies"] == 1
    (dest / "card.md").write_text("approved by nobody")
    rep = verify_workspace(workspace)
    assert not rep.ok and "reports/demo/documents/card.md is not a copy" in rep.problems[0]


def test_cli_verify_prints_the_key_and_the_guarantees(workspace, capsys):
    _grow(workspace, 1)
    code, out, err = _cli(capsys, "--workspace", str(workspace.root), "verify")
    assert code == 0, err
    assert f"signed by key {workspace.keys.key_id}" in out
    assert "held: external checkpoint" in out and "held: stored checkpoints" in out
    code, out, err = _cli(capsys, "--workspace", str(workspace.root), "verify", "--key", "sha256:" + "0" * 64)
    assert code == 3 and "not by sha256:000" in err
