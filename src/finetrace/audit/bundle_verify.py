"""``finetrace verify BUNDLE.zip``: check an audit bundle with nothing but the bundle (no workspace).

What is checked, each problem naming the part of the bundle:

1. ``bundle.json`` is signed by ``public_key.pem``; every file in the zip is listed there with its
   SHA-256 and matches it; nothing is missing or extra.
2. ``checkpoint.json`` is signed by the same key (and is the checkpoint bundle.json names).
3. Every ledger entry: its leaf hash ``SHA-256(0x00 || entry)`` equals the leaf its proof was made
   for, and its RFC 6962 inclusion proof leads to the checkpoint's root (RFC 9162 §2.1.3.2).
4. Entry 0 (``workspace.created``) records the same public key that signed the checkpoint.
5. The adapter folder's digest (the SHA-256 of its finetrace tree manifest) is an ``adapter``
   artifact recorded in a proven entry; each document folder is a recorded ``document`` of it.
6. The attestation: DSSE signature (PAE) by the key; its subjects are exactly the adapter's files
   and digests; its invocation is the run that produced the adapter.
7. Every ``approval`` entry's Ed25519 signature, and that its report is a recorded ``eval_report``.
8. The lineage is complete: the producing run of the adapter and each of that run's inputs
   (base model, datasets, parent adapter) are in proven entries.

Imports only the standard library, ``cryptography`` and finetrace's Merkle/signing code, so it runs on
a fresh install.
"""

from __future__ import annotations

import base64
import json
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..canonical import sha256_bytes
from ..ledger import merkle
from ..ledger.log import Checkpoint
from ..ledger.signing import key_id, public_to_b64
from ..ledger.verify import FAILED, HELD, NOT_CHECKED, VerifyReport
from ..store import tree_digest

SIGNED_SELF = ("bundle.json", "bundle.json.sig")


@dataclass
class BundleReport(VerifyReport):
    """A VerifyReport with the facts that were verified, for people (``verified``)."""

    verified: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "verified": self.verified}


def part_of(path: str) -> str:
    """A human name for the part of the bundle a file belongs to."""
    parts = path.split("/")
    if parts[0] == "adapter":
        return f"adapter file {path}"
    if parts[0] == "documents" and len(parts) > 2:
        return f"document {parts[1]} file {path}"
    if parts[0] == "ledger" and len(parts) == 3:
        seq = parts[2].removesuffix(".json")
        return (
            f"ledger entry {seq} ({path})"
            if parts[1] == "entries"
            else f"inclusion proof of ledger entry {seq} ({path})"
        )
    if path == "checkpoint.json":
        return "checkpoint signature (checkpoint.json)"
    if path == "public_key.pem":
        return "public key (public_key.pem)"
    return path


def _read(path: Path, report: BundleReport) -> dict[str, bytes] | None:
    try:
        z = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        report.problems.append(f"{path} is not a readable zip file: {exc}")
        return None
    files: dict[str, bytes] = {}
    duplicates: set[str] = set()
    with z:
        for info in z.infolist():
            if info.is_dir():
                continue
            p = PurePosixPath(info.filename)
            if p.is_absolute() or ".." in p.parts or p.as_posix() != info.filename or "\\" in info.filename:
                report.problems.append(f"the bundle holds an unsafe path {info.filename!r}")
                continue
            if info.filename in files or info.filename in duplicates:
                # a zip may hold one name twice; readers disagree on which copy counts, so none does
                if info.filename not in duplicates:
                    report.problems.append(
                        f"the bundle holds more than one member named {info.filename!r} "
                        f"({part_of(info.filename)}): refused, a second copy can hide forged "
                        "content"
                    )
                duplicates.add(info.filename)
                continue
            try:
                files[info.filename] = z.read(info)
            except (zipfile.BadZipFile, OSError, zlib.error, EOFError) as exc:  # a byte changed inside the zip
                report.problems.append(f"{part_of(info.filename)} is damaged in the zip: {exc}")
    return files


@dataclass
class _Bundle:
    """What the checks share: the bundle's files, its key, the report, and what earlier checks found."""

    files: dict[str, bytes]
    report: BundleReport
    pub: object = None
    kid: str = ""
    manifest: dict = field(default_factory=dict)
    adapter_digest: str = ""
    cp: Checkpoint | None = None
    entries: dict[int, dict] = field(default_factory=dict)
    arts: dict[str, dict] = field(default_factory=dict)
    ad_files: dict[str, bytes] = field(default_factory=dict)
    ad_art: dict | None = None
    n_sigs: int = 0

    @property
    def problems(self) -> list[str]:
        return self.report.problems

    def sig_ok(self, message: bytes, sig_b64: str) -> bool:
        from cryptography.exceptions import InvalidSignature

        try:
            self.pub.verify(base64.b64decode(sig_b64), message)
            return True
        except (InvalidSignature, ValueError, TypeError):
            return False


def verify_bundle(
    path: str | Path, expected_key_id: str | None = None, checkpoints: list[str | Path] = ()
) -> BundleReport:
    """Verify the bundle at ``path``; the report lists what was checked and every problem found.

    ``expected_key_id`` pins the signing key. Each of ``checkpoints`` (files written by ``finetrace
    checkpoint --export``, or a witness file) pins the key too, and the bundle's checkpoint must extend
    it (equal root at the same size, or the consistency proof the bundle carries from that size).
    """
    report = BundleReport()
    path = Path(path)
    if not path.is_file():
        report.problems.append(f"no bundle at {path}")
        return report
    files = _read(path, report)
    if files is None:
        return report
    for need in ("bundle.json", "bundle.json.sig", "public_key.pem", "checkpoint.json"):
        if need not in files:
            report.problems.append(f"the bundle has no {need}")
    if report.problems:
        return report
    b = _Bundle(files, report)
    if not _check_key(b, expected_key_id) or not _check_manifest(b) or not _check_checkpoint(b):
        return report
    check_external(files, b.cp, b.pub, list(checkpoints), report)
    if not expected_key_id and not checkpoints:
        report.guarantee(
            "signing key",
            NOT_CHECKED,
            f"the bundle is self-consistent under key {b.kid}; whether "
            "that is the publisher's key needs --key or --checkpoint",
        )
    _check_entries(b)
    _check_created(b)
    b.arts = {e["data"]["digest"]: e["data"] for e in b.entries.values() if e["type"] == "artifact.added"}
    _check_adapter(b)
    _check_documents(b)
    _check_attestation(b)
    if "documents/oms-signature/model.sig" in files:  # OpenSSF model signature (optional)
        _verify_oms(files, b.ad_files, report)
    _check_approvals(b)
    report.checks["signatures"] = b.n_sigs
    _check_lineage(b)
    return report


def _check_key(b: _Bundle, expected_key_id: str | None) -> bool:
    """Check 1 (key): public_key.pem is an Ed25519 key, and the pinned one when ``expected_key_id`` is given."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        pub = serialization.load_pem_public_key(b.files["public_key.pem"])
    except ValueError:
        pub = None
    if not isinstance(pub, Ed25519PublicKey):
        b.problems.append("public key (public_key.pem) is not an Ed25519 PEM key")
        return False
    b.pub, b.kid = pub, key_id(pub)
    b.report.key_id = b.kid
    b.report.verified.append(f"public key {b.kid}")
    if expected_key_id and expected_key_id != b.kid:
        b.problems.append(f"the bundle is signed by key {b.kid}, not by the expected key {expected_key_id}")
    if expected_key_id:
        b.report.guarantee(
            "signing key",
            HELD if expected_key_id == b.kid else FAILED,
            f"the bundle is signed by the pinned key {expected_key_id}",
        )
    return True


def _check_manifest(b: _Bundle) -> bool:
    """Check 1 (files): bundle.json is signed, and lists every file of the zip with its SHA-256."""
    files, P = b.files, b.problems
    if not b.sig_ok(files["bundle.json"], files["bundle.json.sig"].decode("ascii", "replace").strip()):
        P.append(
            "bundle manifest signature (bundle.json.sig) does not verify: bundle.json or its signature was changed"
        )
    b.n_sigs += 1
    try:
        manifest = json.loads(files["bundle.json"])
        listed: dict[str, str] = manifest["files"]
        adapter_digest = manifest["adapter"]["digest"]
    except (ValueError, KeyError, TypeError) as exc:
        P.append(f"bundle.json is malformed: {exc}")
        return False
    b.manifest, b.adapter_digest = manifest, adapter_digest
    for p, data in sorted(files.items()):
        if p in SIGNED_SELF:
            continue
        if p not in listed:
            P.append(f"{part_of(p)} is not listed in bundle.json (a file was added)")
        elif listed[p] != sha256_bytes(data):
            P.append(f"{part_of(p)} was modified: its SHA-256 does not match bundle.json")
    for p in listed:
        if p not in files:
            P.append(f"{part_of(p)} is listed in bundle.json but missing from the bundle")
    b.report.checks["files"] = len(files)
    return True


def _check_checkpoint(b: _Bundle) -> bool:
    """Check 2: checkpoint.json is signed by the bundle's key and is the checkpoint bundle.json names."""
    P = b.problems
    try:
        cp = Checkpoint(**json.loads(b.files["checkpoint.json"]))
    except (ValueError, TypeError) as exc:
        P.append(f"checkpoint.json is malformed: {exc}")
        return False
    b.cp = cp
    if cp.key_id != b.kid:
        P.append(f"checkpoint signature (checkpoint.json) names key {cp.key_id}, not the bundle's key {b.kid}")
    if not b.sig_ok(cp.message(), cp.signature):
        P.append("checkpoint signature (checkpoint.json) does not verify: the checkpoint or its signature was changed")
    b.n_sigs += 1
    if b.manifest.get("checkpoint") != cp.to_dict():
        P.append("checkpoint.json is not the checkpoint bundle.json names")
    b.report.verified.append(f"signed checkpoint: {cp.size} ledger entries, root {cp.root}, {cp.time}")
    return True


def _check_entries(b: _Bundle) -> None:
    """Check 3: each ledger entry's leaf hash and RFC 6962 inclusion proof lead to the checkpoint's root."""
    files, P, cp = b.files, b.problems, b.cp
    root = bytes.fromhex(cp.root) if len(cp.root) == 64 else b""
    n_proofs = 0
    for p in sorted(files):
        if not (p.startswith("ledger/entries/") and p.endswith(".json")):
            continue
        name = p.rsplit("/", 1)[1].removesuffix(".json")
        if not name.isdigit():
            P.append(f"unexpected file {p}")
            continue
        seq, raw = int(name), files[p]
        ppath = f"ledger/proofs/{seq}.json"
        if ppath not in files:
            P.append(f"ledger entry {seq} has no inclusion proof ({ppath})")
            continue
        try:
            pr = json.loads(files[ppath])
            proof = [bytes.fromhex(h) for h in pr["proof"]]
            recorded_leaf = bytes.fromhex(pr["leaf"])
            psize = int(pr["size"])
        except (ValueError, KeyError, TypeError) as exc:
            P.append(f"inclusion proof of ledger entry {seq} ({ppath}) is malformed: {exc}")
            continue
        leaf = merkle.leaf_hash(raw)
        if leaf != recorded_leaf:
            P.append(f"ledger entry {seq} ({p}) was modified: its leaf hash differs from the one it was proven with")
            continue
        if psize != cp.size or not merkle.verify_inclusion(seq, cp.size, leaf, proof, root):
            P.append(f"inclusion proof of ledger entry {seq} ({ppath}) does not lead to the signed checkpoint root")
            continue
        try:
            doc = json.loads(raw)
        except ValueError:
            P.append(f"ledger entry {seq} is not JSON")
            continue
        if doc.get("seq") != seq:
            P.append(f"ledger entry {p} says it is entry {doc.get('seq')}")
            continue
        b.entries[seq] = doc
        n_proofs += 1
    b.report.checks["ledger_entries"] = len(b.entries)
    b.report.checks["inclusion_proofs"] = n_proofs
    b.report.verified.append(f"{n_proofs} ledger entries proven included in the checkpoint")


def _check_created(b: _Bundle) -> None:
    """Check 4: entry 0 (``workspace.created``) records the key that signed the checkpoint."""
    created = [e for e in b.entries.values() if e["type"] == "workspace.created"]
    if not created:
        b.problems.append("ledger entry 0 (workspace.created, which records the public key) is missing or unproven")
    elif created[0]["data"].get("public_key") != public_to_b64(b.pub):
        b.problems.append("public key (public_key.pem) is not the key recorded in ledger entry 0")


def _check_adapter(b: _Bundle) -> None:
    """Check 5 (adapter): the adapter folder's digest is an ``adapter`` artifact of a proven entry."""
    b.ad_files = {p[len("adapter/") :]: data for p, data in b.files.items() if p.startswith("adapter/")}
    computed = tree_digest(b.ad_files)
    b.ad_art = b.arts.get(b.adapter_digest)
    if b.ad_art is None or b.ad_art.get("kind") not in ("adapter", "model"):
        b.problems.append(f"the adapter {b.adapter_digest} is not recorded in any proven ledger entry")
    if computed != b.adapter_digest:
        b.problems.append(
            f"adapter files (adapter/) do not match the adapter digest {b.adapter_digest} recorded in "
            f"the ledger (they hash to {computed})"
        )
    else:
        b.report.verified.append(f"adapter {b.adapter_digest}: {len(b.ad_files)} files match the ledger")
    b.report.checks["adapter_files"] = len(b.ad_files)


def _check_documents(b: _Bundle) -> None:
    """Check 5 (documents): each document folder is a recorded ``document`` of the adapter."""
    docs: dict[str, dict[str, bytes]] = {}
    for p, data in b.files.items():
        parts = p.split("/", 2)
        if parts[0] == "documents" and len(parts) == 3:
            docs.setdefault(parts[1], {})[parts[2]] = data
    for slug, dfiles in sorted(docs.items()):
        d = tree_digest(dfiles)
        rec = b.arts.get(d)
        if rec is None or rec.get("kind") != "document":
            b.problems.append(
                f"document {slug} (documents/{slug}/) does not match any document recorded in the "
                "ledger: a file of it was changed, added or removed"
            )
        elif (rec.get("metadata") or {}).get("adapter") != b.adapter_digest:
            b.problems.append(f"document {slug} was generated for another adapter")
        else:
            b.report.verified.append(
                f"document {slug} {d} matches ledger entry of {rec.get('name')}@{rec.get('version')}"
            )
    b.report.checks["documents"] = len(docs)


def _check_attestation(b: _Bundle) -> None:
    """Check 6: the DSSE attestation is signed by the key, about the adapter's files and producing run."""
    P = b.problems
    att = b.files.get("documents/attestation/attestation.dsse.json")
    if att is None:
        P.append("the bundle has no attestation (documents/attestation/attestation.dsse.json)")
        return
    from .attest import verify_envelope

    try:
        stmt = verify_envelope(json.loads(att), b.pub)
        b.n_sigs += 1
        subj = {s["name"]: "sha256:" + s["digest"]["sha256"] for s in stmt.get("subject", [])}
        actual = {p: sha256_bytes(data) for p, data in b.ad_files.items()}
        if subj != actual:
            bad = sorted(set(subj.items()) ^ set(actual.items()))
            P.append(f"attestation subjects do not match the adapter files (first difference: adapter/{bad[0][0]})")
        ext = stmt["predicate"]["buildDefinition"].get("externalParameters", {})
        if ext.get("adapter") != b.adapter_digest:
            P.append("the attestation is about another adapter")
        inv = stmt["predicate"]["runDetails"]["metadata"].get("invocationId")
        ad_art = b.ad_art
        if ad_art and ad_art.get("run_id") and inv != ad_art["run_id"]:
            P.append(f"the attestation names run {inv}, the ledger says {ad_art['run_id']} produced the adapter")
        b.report.checks["attestation_subjects"] = len(subj)
        b.report.verified.append(
            f"attestation (in-toto v1, SLSA provenance v1, DSSE): {len(subj)} subjects, "
            f"{len(stmt['predicate']['buildDefinition'].get('resolvedDependencies', []))} "
            "resolved dependencies"
        )
    except Exception as exc:  # IntegrityError or a malformed statement
        P.append(f"attestation signature or content (documents/attestation/attestation.dsse.json): {exc}")


def _check_approvals(b: _Bundle) -> None:
    """Check 7: every ``approval`` entry is signed by the key and approves a recorded ``eval_report``."""
    from .approvals import approval_message

    n_appr = 0
    for seq, e in sorted(b.entries.items()):
        if e["type"] != "approval":
            continue
        d = e["data"]
        try:
            good = d.get("key_id") == b.kid and b.sig_ok(approval_message(d), d.get("signature", ""))
        except KeyError:
            good = False
        if not good:
            b.problems.append(f"approval signature in ledger entry {seq} (by {d.get('by')}) does not verify")
            continue
        if (b.arts.get(d.get("report")) or {}).get("kind") != "eval_report":
            b.problems.append(f"approval in ledger entry {seq} approves a report that is not in the bundle's lineage")
        b.n_sigs += 1
        n_appr += 1
        b.report.verified.append(f"approval by {d['by']} on {d['date']}: {d['note']}")
    b.report.checks["approvals"] = n_appr


def _check_lineage(b: _Bundle) -> None:
    """Check 8: the adapter's producing run and each of its inputs are in proven entries."""
    entries = b.entries.values()
    runs = {e["data"]["id"]: e["data"] for e in entries if e["type"] == "run.started"}
    finished = {e["data"]["id"]: e["data"] for e in entries if e["type"] == "run.finished"}
    if b.ad_art and b.ad_art.get("run_id"):
        rid = b.ad_art["run_id"]
        run = runs.get(rid)
        if run is None:
            b.problems.append(f"the run {rid} that produced the adapter is not in the bundle's ledger entries")
        else:
            missing = [i for i in run.get("inputs", []) if i not in b.arts]
            if missing:
                b.problems.append(f"inputs of run {rid} are not in the bundle's ledger entries: {', '.join(missing)}")
            status = (finished.get(rid) or {}).get("status")
            b.report.verified.append(
                f"lineage: run {rid} ({run.get('kind')}, {status}) with {len(run.get('inputs', []))} recorded inputs"
            )
    verdicts = [e["data"] for e in entries if e["type"] == "gate.verdict"]
    for v in verdicts:
        b.report.verified.append(
            f"gate verdict: {'passed' if v.get('passed') else 'failed'} (report {v.get('report')})"
        )
    b.report.checks["gate_verdicts"] = len(verdicts)


def check_external(files: dict[str, bytes], cp: Checkpoint, pub, paths: list, report: BundleReport) -> None:
    """The bundle's checkpoint extends each external checkpoint in ``paths``, signed by the same key."""
    from ..errors import IntegrityError
    from ..ledger.signing import verify_signature
    from ..ledger.verify import load_external

    if not paths:
        return
    before = len(report.problems)
    kid = key_id(pub)
    try:
        external = load_external(paths)
        proofs = json.loads(files.get("ledger/consistency.json", b"{}")).get("proofs") or {}
    except (IntegrityError, ValueError, AttributeError) as exc:
        report.problems.append(f"{exc}")
        return
    for ext, where in external:
        what = f"external checkpoint at size {ext.size} ({where})"
        if ext.key_id != kid:
            report.problems.append(f"{what} is signed by key {ext.key_id}; the bundle by {kid}: another key")
            continue
        try:
            verify_signature(pub, ext.message(), ext.signature, what)
        except IntegrityError as exc:
            report.problems.append(str(exc))
            continue
        if ext.size > cp.size:
            report.problems.append(
                f"{what} is newer than the bundle's checkpoint (size {cp.size}): export the "
                "bundle again to check it against that checkpoint"
            )
        elif ext.size == cp.size:
            if ext.root != cp.root:
                report.problems.append(f"the bundle's checkpoint contradicts the {what}: same size, another root")
        else:
            try:
                proof = [bytes.fromhex(h) for h in proofs.get(str(ext.size), [])]
                ok = str(ext.size) in proofs and merkle.verify_consistency(
                    ext.size, cp.size, bytes.fromhex(ext.root), bytes.fromhex(cp.root), proof
                )
            except (ValueError, TypeError):
                ok = False
            if not ok:
                report.problems.append(
                    f"the bundle's ledger does not extend the {what}: no valid consistency "
                    "proof from that size (ledger/consistency.json): the log was rewritten"
                )
        report.checks["external_checkpoints"] = report.checks.get("external_checkpoints", 0) + 1
    held = len(report.problems) == before
    report.guarantee(
        "external checkpoint",
        HELD if held else FAILED,
        f"the bundle's signed ledger extends {len(external)} checkpoint(s) kept outside "
        f"({', '.join(w for _, w in external)}), signed by the pinned key {kid}",
    )
    if held:
        report.verified.append(f"extends {len(external)} external checkpoint(s) signed by {kid}")


def _verify_oms(files: dict[str, bytes], ad_files: dict[str, bytes], report: BundleReport) -> None:
    """Check the OMS signature with model-signing's own verifier when it is installed."""
    import tempfile

    from . import oms

    if not oms.available():
        report.verified.append(
            "OpenSSF model signature present but not checked: model-signing is not installed "
            "(pip install model-signing pyopenssl)"
        )
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for rel, data in ad_files.items():
            (root / "adapter" / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / "adapter" / rel).write_bytes(data)
        (root / "model.sig").write_bytes(files["documents/oms-signature/model.sig"])
        (root / "key.pem").write_bytes(files.get("documents/oms-signature/oms_public_key.pem", b""))
        try:
            oms.verify_folder(root / "adapter", root / "model.sig", root / "key.pem")
        except Exception as exc:
            report.problems.append(f"OpenSSF model signature (documents/oms-signature/model.sig): {exc}")
            return
    report.checks["oms_signature"] = 1
    report.verified.append("OpenSSF model signature (model-signing, key mode) matches the adapter files")
