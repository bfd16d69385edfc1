"""Bundles: a member name held twice is refused; `verify BUNDLE` pins a key or an external checkpoint
(consistency proofs from every older stored checkpoint) and always prints the signing key id."""

from __future__ import annotations

import json
import sqlite3
import warnings
import zipfile

from finetrace.audit import export_bundle, verify_bundle
from finetrace.cli import main
from finetrace.ledger import merkle
from finetrace.ledger.log import Checkpoint, now

WEIGHTS = "adapter/adapter_model.safetensors"


def _members(path):
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def test_a_member_name_held_twice_is_refused(audit_env, tmp_path):
    ws, g = audit_env
    path = export_bundle(ws, g["refs"]["adapter"], tmp_path / "b.zip")
    members = _members(path)
    genuine = dict(members)[WEIGHTS]
    forged = bytearray(genuine)
    forged[-1] ^= 0x55
    out = tmp_path / "twice.zip"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name: that is the attack
        with zipfile.ZipFile(out, "w") as z:
            z.writestr(WEIGHTS, bytes(forged))  # what a reader taking the first copy loads
            for name, data in members:
                z.writestr(name, data)  # genuine last: what a last-wins reader checks
    rep = verify_bundle(out)
    assert not rep.ok
    assert any(f"more than one member named '{WEIGHTS}'" in p for p in rep.problems), rep.problems


def _rewrite_and_resign(ws):
    """An insider with the key rewrites entry 1, re-signs, and removes every witness of the old log."""
    conn = sqlite3.connect(ws.root / "ledger.db")
    body = conn.execute("SELECT body FROM entries WHERE seq=1").fetchone()[0]
    doc = json.loads(body)
    doc["actor"] = "someone-else"
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    conn.execute("UPDATE entries SET body=?, leaf=? WHERE seq=1", (raw, merkle.leaf_hash(raw)))
    conn.execute("DELETE FROM checkpoints")
    conn.commit()
    conn.close()
    (ws.root / "witness.json").unlink()
    ws.witness_path.unlink()


def test_verify_bundle_honours_an_external_checkpoint(audit_env, tmp_path):
    ws, g = audit_env
    auditor = tmp_path / "auditor.json"
    auditor.write_text(json.dumps(ws.checkpoint().to_dict()))
    ws.ledger.append("test.event", {"later": True})
    good = export_bundle(ws, g["refs"]["adapter"], tmp_path / "good.zip")
    rep = verify_bundle(good, checkpoints=[auditor])
    assert rep.ok, rep.problems
    assert rep.checks["external_checkpoints"] == 1 and rep.key_id == ws.keys.key_id
    # a newer checkpoint than the bundle's cannot be checked from the bundle: said, not skipped
    ws.ledger.append("test.event", {"later": 2})
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(ws.checkpoint().to_dict()))
    rep = verify_bundle(good, checkpoints=[newer])
    assert not rep.ok and "is newer than the bundle's checkpoint" in rep.problems[0]

    _rewrite_and_resign(ws)
    ws.ledger.rebuild_index()
    forged = export_bundle(ws, g["refs"]["adapter"], tmp_path / "forged.zip")
    assert verify_bundle(forged).ok  # self-consistent under the workspace key...
    rep = verify_bundle(forged, checkpoints=[auditor])  # ...but not an extension of what the auditor kept
    assert not rep.ok and "does not extend the external checkpoint" in rep.problems[0], rep.problems


def test_a_checkpoint_or_key_of_another_workspace_is_refused(audit_env, tmp_path):
    from finetrace.ledger.signing import KeyPair

    ws, g = audit_env
    path = export_bundle(ws, g["refs"]["adapter"], tmp_path / "b.zip")
    other = KeyPair.create(tmp_path / "other-keys")
    cp = ws.checkpoint()
    unsigned = Checkpoint(cp.size, cp.root, now(), other.key_id, "")
    foreign = tmp_path / "foreign.json"
    foreign.write_text(
        json.dumps(Checkpoint(cp.size, cp.root, unsigned.time, other.key_id, other.sign(unsigned.message())).to_dict())
    )
    rep = verify_bundle(path, checkpoints=[foreign])
    assert not rep.ok and f"signed by key {other.key_id}" in rep.problems[0]
    rep = verify_bundle(path, expected_key_id=other.key_id)
    assert not rep.ok and f"not by the expected key {other.key_id}" in rep.problems[0]


def test_cli_verify_bundle_prints_the_key_and_pins_it(audit_env, tmp_path, capsys):
    ws, g = audit_env
    path = export_bundle(ws, g["refs"]["adapter"], tmp_path / "b.zip")
    kid = ws.keys.key_id
    assert main(["verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"signed by key {kid} (pin it with --key or --checkpoint)" in out
    assert "not checked: signing key" in out
    assert main(["verify", str(path), "--key", kid]) == 0
    assert "held: signing key" in capsys.readouterr().out
    assert main(["verify", str(path), "--key", "sha256:" + "1" * 64]) == 3
    assert "not by the expected key sha256:111" in capsys.readouterr().err
