"""``finetrace verify``: recompute everything the workspace claims and name the first thing that differs.

Checks, in order: every log entry (contiguous sequence numbers, leaf hash = SHA-256(0x00||entry), the
entry's own ``seq`` and ``type``), every stored checkpoint (Ed25519 signature with the workspace key,
size within the log, root equal to the recomputed root of that prefix), ``witness.json`` (present, and one
of the signed checkpoints), the external witness and any ``--checkpoint`` files (the log must extend
them), the index against a replay of the log, every object in the store (re-hashed, every file of every
folder artifact), and every file under ``reports/`` (a copy of a stored object).

What each check can and cannot catch is reported as ``guarantees`` (held, failed, not checked): the
checks that use only what is inside the workspace catch edits by anyone without the workspace key; a
deletion of the last entries together with their checkpoints and witness, or a rewrite re-signed with
the workspace key, is caught only against a checkpoint kept outside the workspace. ``docs/ledger.md``
states the same list.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from ..canonical import DIGEST_RE, sha256_file
from ..errors import IntegrityError
from . import merkle, witness
from .log import Checkpoint, Ledger
from .signing import key_id, verify_signature

HELD, FAILED, NOT_CHECKED = "held", "failed", "not checked"


@dataclass
class VerifyReport:
    checks: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    guarantees: list[dict] = field(default_factory=list)  # {"guarantee", "status", "detail"}
    key_id: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def guarantee(self, name: str, status: str, detail: str) -> None:
        self.guarantees.append({"guarantee": name, "status": status, "detail": detail})

    # duplicates: alike ledger/records.py:to_dict on purpose (to_dict of a record type).
    # duplicates: alike serve/parity.py:to_dict on purpose (to_dict of a record type).
    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "key_id": self.key_id,
            "checks": self.checks,
            "problems": self.problems,
            "guarantees": self.guarantees,
        }


def _held(report: VerifyReport, before: int) -> str:
    return HELD if len(report.problems) == before else FAILED


def verify_entries(ledger: Ledger, report: VerifyReport) -> list[bytes]:
    """Sequence, leaf hash and self-description of every entry; returns the recomputed leaf hashes."""
    before = len(report.problems)
    leaves: list[bytes] = []
    expected = 0
    for seq, typ, leaf, body in ledger.conn.execute("SELECT seq, type, leaf, body FROM entries ORDER BY seq"):
        if seq != expected:
            report.problems.append(f"ledger entry {expected} is missing (next entry is {seq})")
            expected = seq
        body = bytes(body)
        if merkle.leaf_hash(body) != bytes(leaf):
            report.problems.append(f"ledger entry {seq} was modified (its leaf hash does not match its content)")
        try:
            doc = json.loads(body)
            if doc.get("seq") != seq or doc.get("type") != typ:
                report.problems.append(
                    f"ledger entry {seq} was moved or retyped (it says seq {doc.get('seq')}, type {doc.get('type')!r})"
                )
        except ValueError:
            report.problems.append(f"ledger entry {seq} is not valid JSON")
        leaves.append(merkle.leaf_hash(body))
        expected += 1
    report.checks["entries"] = len(leaves)
    report.guarantee(
        "entries", _held(report, before), f"{len(leaves)} entries hash to their stored leaves, numbered without gaps"
    )
    return leaves


def _check_checkpoint(
    ledger: Ledger, cp: Checkpoint, leaves: list[bytes], public_key, what: str, report: VerifyReport
) -> bool:
    kid = key_id(public_key)
    if cp.key_id != kid:
        report.problems.append(f"{what} was signed by another key ({cp.key_id}, the workspace key is {kid})")
        return False
    try:
        verify_signature(public_key, cp.message(), cp.signature, what)
    except IntegrityError as exc:
        report.problems.append(str(exc))
        return False
    if cp.size > len(leaves):
        report.problems.append(f"the ledger was truncated: {what} covers {cp.size} entries, the log has {len(leaves)}")
        return False
    if merkle.root(leaves[: cp.size]).hex() != cp.root:
        first = _first_changed(ledger, cp.size)
        report.problems.append(
            f"the ledger no longer matches its signed {what}"
            + (f": entry {first} differs" if first is not None else ": the log was rewritten and its leaves recomputed")
        )
        return False
    return True


def verify_log(
    ledger: Ledger, public_key, report: VerifyReport, external: list[tuple[Checkpoint, str]] = ()
) -> list[bytes]:
    """Entries, stored checkpoints, witness.json and external checkpoints ``[(checkpoint, where)]``."""
    leaves = verify_entries(ledger, report)
    kid = key_id(public_key)
    report.key_id = kid

    before = len(report.problems)
    cps = ledger.checkpoints()
    for cp in cps:
        _check_checkpoint(ledger, cp, leaves, public_key, f"checkpoint at size {cp.size}", report)
    report.guarantee(
        "stored checkpoints",
        _held(report, before),
        f"the log matches all {len(cps)} checkpoints stored in the workspace, signed by {kid}: "
        "an entry edited by anyone without the workspace key is caught",
    )

    before = len(report.problems)
    _verify_local_witness(ledger, cps, leaves, report)
    report.guarantee(
        "witness.json", _held(report, before), "witness.json is present and is one of the signed checkpoints"
    )

    before = len(report.problems)
    covered = 0
    for cp, where in external:
        if _check_checkpoint(
            ledger, cp, leaves, public_key, f"external checkpoint at size {cp.size} ({where})", report
        ):
            covered = max(covered, cp.size)
    report.checks["checkpoints"] = len(cps) + len(external)
    if not external:
        report.guarantee(
            "external checkpoint",
            NOT_CHECKED,
            "no checkpoint kept outside the workspace was found (external witness or --checkpoint): "
            "removing the last entries together with their checkpoints and witness.json, or "
            "rewriting the log and re-signing it with the workspace key, would not be caught",
        )
    else:
        report.guarantee(
            "external checkpoint",
            _held(report, before),
            f"the log extends {len(external)} checkpoint(s) kept outside the workspace "
            f"({', '.join(w for _, w in external)}): removing or rewriting any of the first {covered} "
            "entries, even re-signed with the workspace key, is caught while that copy is out of "
            "the rewriter's reach",
        )
    return leaves


def _verify_local_witness(ledger: Ledger, cps: list[Checkpoint], leaves: list[bytes], report: VerifyReport) -> None:
    if not ledger.witness.exists():
        report.problems.append(
            f"the witness file {ledger.witness.name} is missing: checkpoints and the last "
            "entries may have been removed with it (check against an exported checkpoint)"
        )
        return
    try:
        w = witness.parse_checkpoint(json.loads(ledger.witness.read_bytes()), ledger.witness.name)
    except (ValueError, IntegrityError) as exc:
        report.problems.append(f"the witness file {ledger.witness.name} is damaged: {exc}")
        return
    if not any(c.size == w.size and c.root == w.root and c.signature == w.signature for c in cps):
        report.problems.append(
            f"the witness checkpoint (size {w.size}) is not among the stored "
            "checkpoints: checkpoints were deleted or the log rewritten"
        )
    elif w.size > len(leaves):
        report.problems.append(f"the ledger was truncated below its witness checkpoint (size {w.size})")


def _first_changed(ledger: Ledger, size: int) -> int | None:
    """Entries whose stored leaf no longer matches their content, or gaps, point at the change."""
    expected = 0
    for seq, leaf, body in ledger.conn.execute(
        "SELECT seq, leaf, body FROM entries WHERE seq < ? ORDER BY seq", (size,)
    ):
        if seq != expected or merkle.leaf_hash(bytes(body)) != bytes(leaf):
            return expected
        expected += 1
    return None


def verify_index(ledger: Ledger, report: VerifyReport) -> None:
    before = len(report.problems)
    live, replay = ledger.index_snapshot(), ledger.replay_index()
    for table in live:
        if live[table] != replay[table]:
            extra = set(live[table]) - set(replay[table])
            missing = set(replay[table]) - set(live[table])
            sample = next(iter(extra or missing))
            report.problems.append(
                f"index table '{table}' does not match the log ({len(extra)} extra, "
                f"{len(missing)} missing rows, e.g. {sample[:2]}); "
                "`finetrace verify --rebuild-index` rebuilds it from the log"
            )
    report.checks["index_rows"] = sum(len(v) for v in live.values())
    report.guarantee("index", _held(report, before), "the runs/artifacts index equals a replay of the log")


def verify_objects(store, ledger: Ledger, report: VerifyReport) -> None:
    before = len(report.problems)
    n = 0
    for digest in store:
        try:
            store.verify(digest)
        except IntegrityError as exc:
            report.problems.append(str(exc))
        n += 1
    report.checks["objects"] = n
    # objects deleted on purpose (an erasure's --purge): absent by record, their digests kept
    purged = {d for e in ledger.entries(type="data.purged") for d in e.data.get("digests", [])}
    report.checks["purged"] = len(purged)
    for (digest,) in ledger.conn.execute("SELECT digest FROM artifacts ORDER BY seq"):
        if digest in purged:
            continue
        if not store.has(digest):
            if store.root.exists():
                report.problems.append(f"artifact {digest} has no object in the store")
            continue
        if store.is_tree(digest):
            for e in store.tree(digest):
                if not store.has(e.digest) and e.digest not in purged:
                    report.problems.append(f"file {e.path} of folder {digest} is missing from the store")
    report.guarantee(
        "objects", _held(report, before), f"{n} stored objects hash to their names; every recorded artifact is present"
    )


def verify_reports(ws, report: VerifyReport) -> None:
    """Every file under ``reports/`` (copies for people) is byte-identical to an object in the store."""
    folder = Path(ws.root) / "reports"
    before, n = len(report.problems), 0
    for p in sorted(folder.rglob("*")) if folder.is_dir() else []:
        if not p.is_file():
            continue
        n += 1
        if p.name == ".finetrace-complete":  # a materialised folder's marker: it names a stored tree
            named = p.read_text("utf-8", "replace").strip()
            if not (DIGEST_RE.match(named) and ws.store.has(named)):
                report.problems.append(f"{p.relative_to(ws.root)} names no folder in the store: it was edited")
            continue
        if not ws.store.has(sha256_file(p)):
            report.problems.append(
                f"{p.relative_to(ws.root)} is not a copy of anything in the store: it was "
                "edited after it was written (the verified originals are the document and "
                "eval_report artifacts: `finetrace show`)"
            )
    report.checks["report_copies"] = n
    report.guarantee(
        "report copies", _held(report, before), f"{n} files under reports/ are exact copies of stored objects"
    )


def load_external(paths: list[Path]) -> list[tuple[Checkpoint, str]]:
    """Checkpoints from ``--checkpoint`` files (exported checkpoints or witness files)."""
    out = []
    for p in paths:
        try:
            doc = json.loads(Path(p).read_bytes())
        except (OSError, ValueError) as exc:
            raise IntegrityError(f"--checkpoint {p} cannot be read as JSON: {exc}") from None
        out.append((witness.parse_checkpoint(doc, f"--checkpoint {p}"), str(p)))
    return out


def verify_workspace(ws, external_checkpoints: list[Path] = ()) -> VerifyReport:
    report = VerifyReport()
    external = load_external(list(external_checkpoints))
    try:
        ext = witness.load(ws.witness_path)
    except IntegrityError as exc:
        report.problems.append(str(exc))
        ext = None
    if ext is not None:
        external.append((ext, f"external witness {ws.witness_path}"))
    try:
        verify_log(ws.ledger, ws.public_key, report, external)
        verify_index(ws.ledger, report)
        verify_objects(ws.store, ws.ledger, report)
    except sqlite3.DatabaseError as exc:
        report.problems.append(str(ws.ledger.damaged(exc)))
    verify_reports(ws, report)
    return report
