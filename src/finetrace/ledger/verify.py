"""``finetrace verify``: recompute everything the workspace claims and name the first thing that differs.

Checks, in order: every log entry (contiguous sequence numbers, leaf hash = SHA-256(0x00||entry), the
entry's own ``seq`` and ``type``), every stored checkpoint (Ed25519 signature with the workspace key,
size within the log, root equal to the recomputed root of that prefix: an edit, deletion or truncation
fails here), the witness file, optional external checkpoints (consistency), the index against a replay
of the log, and every object in the store (re-hashed), including every file of every folder artifact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import IntegrityError
from . import merkle
from .log import Checkpoint, Ledger
from .signing import key_id, verify_signature


@dataclass
class VerifyReport:
    checks: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checks": self.checks, "problems": self.problems}


def verify_log(ledger: Ledger, public_key, report: VerifyReport,
               external: list[Checkpoint] = ()) -> list[bytes]:
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
                report.problems.append(f"ledger entry {seq} was moved or retyped (it says seq {doc.get('seq')}, "
                                       f"type {doc.get('type')!r})")
        except ValueError:
            report.problems.append(f"ledger entry {seq} is not valid JSON")
        leaves.append(merkle.leaf_hash(body))
        expected += 1
    report.checks["entries"] = len(leaves)

    kid = key_id(public_key)
    cps = ledger.checkpoints()
    for cp in list(cps) + list(external):
        what = f"checkpoint at size {cp.size}"
        if cp.key_id != kid:
            report.problems.append(f"{what} was signed by another key ({cp.key_id})")
            continue
        try:
            verify_signature(public_key, cp.message(), cp.signature, what)
        except IntegrityError as exc:
            report.problems.append(str(exc))
            continue
        if cp.size > len(leaves):
            report.problems.append(f"the ledger was truncated: {what} covers {cp.size} entries, "
                                   f"the log has {len(leaves)}")
            continue
        if merkle.root(leaves[:cp.size]).hex() != cp.root:
            first = _first_changed(ledger, cp.size)
            report.problems.append(f"the ledger no longer matches its signed {what}" +
                                   (f": entry {first} differs" if first is not None else ""))
    report.checks["checkpoints"] = len(cps) + len(external)

    if ledger.witness.exists():
        w = json.loads(ledger.witness.read_text())
        if not any(c.size == w["size"] and c.root == w["root"] for c in cps):
            report.problems.append(f"the witness checkpoint (size {w['size']}) is not among the stored "
                                   "checkpoints: checkpoints were deleted or the log rewritten")
        elif w["size"] > len(leaves):
            report.problems.append(f"the ledger was truncated below its witness checkpoint (size {w['size']})")
    return leaves


def _first_changed(ledger: Ledger, size: int) -> int | None:
    """Entries whose stored leaf no longer matches their content, or gaps, point at the change."""
    expected = 0
    for seq, leaf, body in ledger.conn.execute("SELECT seq, leaf, body FROM entries WHERE seq < ? ORDER BY seq",
                                               (size,)):
        if seq != expected or merkle.leaf_hash(bytes(body)) != bytes(leaf):
            return expected
        expected += 1
    return None


def verify_index(ledger: Ledger, report: VerifyReport) -> None:
    live, replay = ledger.index_snapshot(), ledger.replay_index()
    for table in live:
        if live[table] != replay[table]:
            extra = set(live[table]) - set(replay[table])
            missing = set(replay[table]) - set(live[table])
            sample = next(iter(extra or missing))
            report.problems.append(f"index table '{table}' does not match the log ({len(extra)} extra, "
                                   f"{len(missing)} missing rows, e.g. {sample[:2]}); "
                                   "`finetrace verify --rebuild-index` rebuilds it from the log")
    report.checks["index_rows"] = sum(len(v) for v in live.values())


def verify_objects(store, ledger: Ledger, report: VerifyReport) -> None:
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


def verify_workspace(ws, external_checkpoints: list[Path] = ()) -> VerifyReport:
    report = VerifyReport()
    external = [Checkpoint(**json.loads(Path(p).read_text())) for p in external_checkpoints]
    verify_log(ws.ledger, ws.public_key, report, external)
    verify_index(ws.ledger, report)
    verify_objects(ws.store, ws.ledger, report)
    return report
