"""Ledger: runs and artifacts, versions, lineage, tamper evidence, concurrent writers."""

import json
import sqlite3
import subprocess
import sys

import pytest

from finetrace.errors import InputError, NotFoundError
from finetrace.ledger import lineage, verify_workspace
from finetrace.workspace import Workspace


def _pipeline(ws):
    """source -> import -> dataset -> train -> adapter, recorded like the stages do."""
    src = ws.store.put_bytes(b"raw,rows\n1,2\n")
    base = ws.store.put_bytes(b"base-model")
    with ws.ledger.run("import", config={"file": "raw.csv"}, inputs=[]) as run:
        run.output("source", src, metadata={"path": "raw.csv"})
        ds = run.output("dataset", ws.store.put_bytes(b"parquet"), name="legal")
        run.input(src)
    ws.ledger.add_artifact("base_model", base, name="tiny")
    with ws.ledger.run("train", config={"lr": 1e-3}, inputs=[base, ds.digest], seed=3) as run:
        ad = run.output("adapter", ws.store.put_bytes(b"adapter"), name="legal-lora")
        run.metrics["loss"] = 0.5
    ws.checkpoint()
    return src, base, ds, ad


def test_runs_artifacts_versions_and_resolve(workspace):
    src, base, ds, ad = _pipeline(workspace)
    led = workspace.ledger
    assert led.resolve("legal").digest == ds.digest
    assert led.resolve("legal@1").aliases == ["legal@1"]
    assert led.resolve(ad.digest[7:19]).digest == ad.digest
    # same content under the same name: no new version; new content: version 2
    assert led.add_artifact("dataset", ds.digest, name="legal").aliases == ["legal@1"]
    v2 = led.add_artifact("dataset", workspace.store.put_bytes(b"parquet v2"), name="legal")
    assert v2.ref == "legal@2" and led.resolve("legal").digest == v2.digest
    run = led.get_run(ad.run_id)
    assert run.kind == "train" and run.status == "succeeded" and run.metrics == {"loss": 0.5}
    assert run.inputs == [base, ds.digest] and run.outputs == [ad.digest]
    assert run.environment["seed"] == 3 and "torch" in run.environment["packages"]
    with pytest.raises(NotFoundError, match="no artifact named 'nope'"):
        led.resolve("nope")
    with pytest.raises(InputError, match="is a dataset, not a adapter"):
        led.resolve("legal", kind="adapter")


def test_failed_run_is_recorded(workspace):
    with pytest.raises(RuntimeError):
        with workspace.ledger.run("train", config={}):
            raise RuntimeError("boom")
    r = workspace.ledger.runs("train")[-1]
    assert r.status == "failed" and "boom" in r.error


def test_lineage_up_and_down(workspace):
    src, base, ds, ad = _pipeline(workspace)
    up = lineage(workspace.ledger, ad.digest, "up")
    assert set(up["artifacts"]) == {ad.digest, ds.digest, base, src}
    down = lineage(workspace.ledger, src, "down")
    assert ad.digest in down["artifacts"]


def test_verify_passes_then_detects_edit_delete_truncate(workspace, tmp_path):
    _pipeline(workspace)
    assert verify_workspace(workspace).ok
    db = workspace.root / "ledger.db"
    size = workspace.ledger.size()
    workspace.close()

    def tampered(sql, *args):
        conn = sqlite3.connect(db)
        conn.execute(sql, args)
        conn.commit()
        conn.close()
        ws = Workspace.open(workspace.root)
        rep = verify_workspace(ws)
        ws.close()
        return rep

    import shutil

    backup = tmp_path / "backup.db"
    shutil.copy(db, backup)

    # edit one entry's content (leaf left as it was)
    conn = sqlite3.connect(db)
    body = conn.execute("SELECT body FROM entries WHERE seq=3").fetchone()[0]
    conn.close()
    assert b'"name":"legal"' in body
    edited = body.replace(b'"name":"legal"', b'"name":"other"')
    rep = tampered("UPDATE entries SET body=? WHERE seq=3", edited)
    assert not rep.ok and "ledger entry 3 was modified" in rep.problems[0]

    # edit the entry AND its leaf hash: the signed checkpoint catches it
    from finetrace.ledger.merkle import leaf_hash

    shutil.copy(backup, db)
    rep = tampered("UPDATE entries SET body=?, leaf=? WHERE seq=3", edited, leaf_hash(edited))
    assert not rep.ok and any("signed checkpoint" in p for p in rep.problems)

    # delete an entry
    shutil.copy(backup, db)
    rep = tampered("DELETE FROM entries WHERE seq=2")
    assert not rep.ok and "ledger entry 2 is missing" in rep.problems[0]

    # truncate the log
    shutil.copy(backup, db)
    rep = tampered("DELETE FROM entries WHERE seq >= ?", size - 2)
    assert not rep.ok and any("truncated" in p for p in rep.problems)

    # index edited (a run's metrics rewritten) while the log is intact
    shutil.copy(backup, db)
    rep = tampered("UPDATE runs SET metrics='{\"loss\":0.01}' WHERE kind='train'")
    assert not rep.ok and "index table 'runs'" in rep.problems[0]


def test_verify_detects_object_byte_flip(workspace):
    _, _, ds, _ = _pipeline(workspace)
    p = workspace.store.path(ds.digest)
    p.chmod(0o644)
    p.write_bytes(b"parquex")
    rep = verify_workspace(workspace)
    assert not rep.ok and ds.digest in rep.problems[0] and "corrupt" in rep.problems[0]


APPENDER = """
import sys
from finetrace.workspace import Workspace
ws = Workspace.open(sys.argv[1])
for i in range(300):
    ws.ledger.append("test.event", {"writer": sys.argv[2], "i": i})
ws.checkpoint()
"""


def test_two_processes_append_concurrently(workspace):
    base = workspace.ledger.size()
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(workspace.root), w]) for w in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert workspace.ledger.size() == base + 600
    events = [e.data for e in workspace.ledger.entries(type="test.event")]
    for w in "ab":
        assert [d["i"] for d in events if d["writer"] == w] == list(range(300))
    rep = verify_workspace(workspace)
    assert rep.ok, rep.problems
    assert rep.checks["entries"] == base + 600


def test_external_checkpoint_consistency(workspace, tmp_path):
    _pipeline(workspace)
    cp = workspace.checkpoint()
    exported = tmp_path / "cp.json"
    exported.write_text(json.dumps(cp.to_dict()))
    workspace.ledger.append("test.event", {"after": True})
    workspace.checkpoint()
    assert verify_workspace(workspace, [exported]).ok
    forged = dict(cp.to_dict(), root="00" * 32)
    exported.write_text(json.dumps(forged))
    rep = verify_workspace(workspace, [exported])
    assert not rep.ok and "bad signature" in rep.problems[0]
