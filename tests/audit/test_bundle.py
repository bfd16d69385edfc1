"""Audit bundles: export, offline verification, tamper evidence per part, a fresh process with no workspace."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from finetrace.audit import export_bundle, verify_bundle
from finetrace.audit.oms import available as oms_available


@pytest.fixture
def bundle(audit_env, tmp_path):
    ws, g = audit_env
    path = export_bundle(ws, g["refs"]["adapter"], tmp_path / "bundle.zip")
    return ws, g, path


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def _rewrite(path: Path, files: dict[str, bytes], out: Path) -> Path:
    """What an attacker does: a well-formed zip with changed content (CRCs recomputed)."""
    with zipfile.ZipFile(out, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return out


def test_bundle_holds_the_whole_lineage_and_verifies(bundle):
    ws, g, path = bundle
    files = _members(path)
    adapter_files = {e.path for e in ws.store.tree(g["digests"]["adapter"])}
    assert {f"adapter/{p}" for p in adapter_files} <= set(files)
    assert {
        "bundle.json",
        "bundle.json.sig",
        "checkpoint.json",
        "public_key.pem",
        "README.txt",
        "documents/annex-iv/annex_iv.md",
        "documents/model-card/README.md",
        "documents/mlbom/mlbom.cdx.json",
        "documents/attestation/attestation.dsse.json",
    } <= set(files)
    entries = {int(n.split("/")[-1][:-5]): json.loads(b) for n, b in files.items() if n.startswith("ledger/entries/")}
    assert {n.replace("entries", "proofs") for n in files if n.startswith("ledger/entries/")} <= set(files)
    types = [e["type"] for e in entries.values()]
    assert types.count("workspace.created") == 1 and "approval" in types and "gate.verdict" in types
    recorded = {e["data"]["digest"] for e in entries.values() if e["type"] == "artifact.added"}
    source = ws.ledger.get_run(ws.ledger.artifact(g["digests"]["data"]).run_id).inputs[0]
    # base model, dataset, its source file, adapter, eval report: the whole lineage
    assert {g["digests"][k] for k in ("base", "data", "adapter", "report")} | {source} <= recorded
    cp = json.loads(files["checkpoint.json"])
    assert cp["size"] > max(entries)
    report = verify_bundle(path)
    assert report.ok, report.problems
    assert report.checks["ledger_entries"] == report.checks["inclusion_proofs"] == len(entries)
    assert report.checks["adapter_files"] == len(adapter_files) and report.checks["approvals"] == 1
    assert report.checks["documents"] == 6 and report.checks["signatures"] == 4  # manifest, checkpoint, DSSE, approval
    assert any("approval by Ada Lovelace" in v for v in report.verified)
    export = [r for r in ws.ledger.runs("export")]
    assert len(export) == 1 and export[0].outputs and ws.ledger.artifact(export[0].outputs[0]).kind == "bundle"
    assert verify_bundle(path, expected_key_id=ws.keys.key_id).ok
    wrong = verify_bundle(path, expected_key_id="sha256:" + "0" * 64)
    assert not wrong.ok and "not by the expected key" in wrong.problems[0]


def _flip(data: bytes, at: int | None = None) -> bytes:
    i = len(data) // 2 if at is None else at
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]


def _first_entry(files, type_):
    for n, b in sorted(files.items()):
        if n.startswith("ledger/entries/") and json.loads(b)["type"] == type_:
            return n
    raise AssertionError(type_)


def _tamper_entry(files):
    n = _first_entry(files, "run.started")
    doc = json.loads(files[n])
    doc["data"]["config"]["lr"] = 0.5
    files[n] = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return f"ledger entry {n.split('/')[-1][:-5]}"


def _tamper_proof(files):
    n = sorted(k for k in files if k.startswith("ledger/proofs/"))[1]
    doc = json.loads(files[n])
    doc["proof"][0] = "00" * 32
    files[n] = json.dumps(doc).encode()
    return f"inclusion proof of ledger entry {n.split('/')[-1][:-5]}"


def _tamper_approval(files):
    n = _first_entry(files, "approval")
    doc = json.loads(files[n])
    doc["data"]["note"] = "approved without reading"
    files[n] = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return f"ledger entry {n.split('/')[-1][:-5]}"


def _tamper_checkpoint_sig(files):
    doc = json.loads(files["checkpoint.json"])
    sig = bytearray(base64.b64decode(doc["signature"]))
    sig[0] ^= 0x01
    doc["signature"] = base64.b64encode(bytes(sig)).decode()
    files["checkpoint.json"] = json.dumps(doc).encode()
    return "checkpoint signature"


def _tamper_attestation_sig(files):
    n = "documents/attestation/attestation.dsse.json"
    env = json.loads(files[n])
    sig = bytearray(base64.b64decode(env["signatures"][0]["sig"]))
    sig[7] ^= 0x01
    env["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    files[n] = json.dumps(env).encode()
    return "attestation"


def _tamper_adapter_byte(files):
    n = "adapter/adapter_model.safetensors"
    files[n] = _flip(files[n], len(files[n]) - 3)  # a weight byte, not the header
    return "adapter file adapter/adapter_model.safetensors"


def _tamper_document(files):
    n = "documents/annex-iv/annex_iv.md"
    files[n] = files[n].replace(b"## 5. Risk management system", b"## 5. Risk management system (certified)")
    return "document annex-iv"


def _tamper_manifest_sig(files):
    files["bundle.json.sig"] = _flip(files["bundle.json.sig"], 4)
    return "bundle manifest signature"


def _remove_entry(files):
    n = _first_entry(files, "gate.verdict")
    del files[n]
    return f"ledger entry {n.split('/')[-1][:-5]}"


TAMPERS = {
    "adapter byte": _tamper_adapter_byte,
    "document": _tamper_document,
    "ledger entry": _tamper_entry,
    "approval entry": _tamper_approval,
    "proof": _tamper_proof,
    "checkpoint signature": _tamper_checkpoint_sig,
    "attestation signature": _tamper_attestation_sig,
    "manifest signature": _tamper_manifest_sig,
    "removed entry": _remove_entry,
}


@pytest.mark.parametrize("what", sorted(TAMPERS))
def test_tampering_with_any_part_fails_and_names_it(bundle, tmp_path, what):
    _, _, path = bundle
    files = _members(path)
    part = TAMPERS[what](files)
    report = verify_bundle(_rewrite(path, files, tmp_path / "tampered.zip"))
    assert not report.ok
    assert any(part in p for p in report.problems), (part, report.problems)


def test_an_attacker_who_rewrites_the_manifest_is_still_caught(bundle, tmp_path):
    """Changing the adapter and fixing the SHA-256 in bundle.json without the key: the manifest signature
    fails, and the adapter digest no longer matches the signed ledger."""
    import hashlib

    _, _, path = bundle
    files = _members(path)
    _tamper_adapter_byte(files)
    manifest = json.loads(files["bundle.json"])
    n = "adapter/adapter_model.safetensors"
    manifest["files"][n] = "sha256:" + hashlib.sha256(files[n]).hexdigest()
    files["bundle.json"] = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
    report = verify_bundle(_rewrite(path, files, tmp_path / "t.zip"))
    assert any("bundle manifest signature" in p for p in report.problems)
    assert any("adapter files (adapter/) do not match the adapter digest" in p for p in report.problems)
    assert any("attestation subjects do not match" in p for p in report.problems)


def test_a_byte_flipped_inside_the_zip_is_reported(bundle, tmp_path):
    _, _, path = bundle
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("adapter/adapter_model.safetensors")
    raw[info.header_offset + 30 + len(info.filename) + 5] ^= 0xFF
    bad = tmp_path / "flipped.zip"
    bad.write_bytes(bytes(raw))
    report = verify_bundle(bad)
    assert not report.ok and any("adapter" in p for p in report.problems), report.problems


def test_verify_in_a_fresh_process_with_no_workspace(bundle, tmp_path):
    """`finetrace verify bundle.zip` in an isolated interpreter (-I: no user site, no PYTHON* variables),
    in an empty folder, with no workspace anywhere, and without importing torch."""
    ws, _, path = bundle
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    local = empty / "bundle.zip"
    local.write_bytes(path.read_bytes())
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(empty), "LANG": "C.UTF-8"}
    code = (
        "import sys\nfrom finetrace.cli import main\nrc = main(['verify', 'bundle.zip'])\n"
        "assert 'torch' not in sys.modules, 'verify imported torch'\nsys.exit(rc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=empty, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "verify: OK" in proc.stdout and "checked 4 signatures" in proc.stdout
    assert not (empty / ".finetrace").exists()
    files = _members(local)
    _tamper_document(files)
    _rewrite(local, files, empty / "bad.zip")
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code.replace("bundle.zip", "bad.zip")],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3 and "FAIL: document annex-iv" in proc.stderr, proc.stderr


@pytest.mark.skipif(not oms_available(), reason="model-signing (and pyopenssl) not installed")
def test_openssf_model_signature_in_key_mode(audit_env, tmp_path):
    """The adapter is signed with model-signing (key mode); its own verifier accepts the adapter files and
    rejects a changed byte; the bundle verifier runs it too."""
    from finetrace.audit import generate_documents
    from finetrace.audit.oms import verify_folder
    from finetrace.errors import IntegrityError

    ws, g = audit_env
    arts = generate_documents(ws, g["refs"]["adapter"], intended_use=g["intended_use"], formats=("md",), oms=True)
    sig = next(a for a in arts if a.metadata["document"] == "oms_signature")
    assert sig.metadata["files"] == ["model.sig", "oms_public_key.pem"]
    sig_dir = ws.store.materialize(sig.digest)
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    for e in ws.store.tree(g["digests"]["adapter"]):
        (adapter_dir / e.path).write_bytes(ws.store.read_bytes(e.digest))
    verify_folder(adapter_dir, sig_dir / "model.sig", sig_dir / "oms_public_key.pem")
    w = adapter_dir / "adapter_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-2] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not verify"):
        verify_folder(adapter_dir, sig_dir / "model.sig", sig_dir / "oms_public_key.pem")
    path = export_bundle(ws, g["refs"]["adapter"], tmp_path / "b.zip")
    report = verify_bundle(path)
    assert report.ok, report.problems
    assert report.checks["oms_signature"] == 1 and report.checks["documents"] == 7


def test_export_regenerates_documents_older_than_the_latest_approval(audit_env, tmp_path):
    from finetrace.audit import approve

    ws, g = audit_env
    before = len(ws.ledger.runs("document"))
    path = export_bundle(ws, g["refs"]["adapter"], tmp_path / "a.zip")
    assert len(ws.ledger.runs("document")) == before  # documents are current: reused
    approve(ws, g["refs"]["adapter"], "Grace Hopper", "re-checked the group results")
    path = export_bundle(ws, g["refs"]["adapter"], tmp_path / "b.zip")
    runs = ws.ledger.runs("document")
    assert len(runs) == before + 1
    assert runs[-1].config["intended_use"] == runs[-2].config["intended_use"]  # same intended-use facts
    annex = _members(path)["documents/annex-iv/annex_iv.md"].decode()
    assert "Grace Hopper approved report" in annex and "Ada Lovelace approved report" in annex
    assert "Intended use and limitations were not provided" not in annex
    report = verify_bundle(path)
    assert report.ok and report.checks["approvals"] == 2


def test_not_a_bundle_is_reported_not_raised(tmp_path):
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    report = verify_bundle(junk)
    assert not report.ok and "is not a readable zip file" in report.problems[0]
    assert "no bundle at" in verify_bundle(tmp_path / "missing.zip").problems[0]
    empty = _rewrite(junk, {"README.txt": b"hello"}, tmp_path / "empty.zip")
    assert set(verify_bundle(empty).problems) == {
        f"the bundle has no {n}" for n in ("bundle.json", "bundle.json.sig", "public_key.pem", "checkpoint.json")
    }
