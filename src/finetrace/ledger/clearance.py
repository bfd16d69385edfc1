"""Whether an adapter may go further (publish, deploy): the verdict of its eval gates, and overrides.

Evaluation records a ``gate.verdict`` event per evaluated adapter; a named person may record a
``gate.override`` for an adapter that failed. Serving and publishing ask ``clearance`` and refuse
anything that is not ``passed`` or ``overridden``. Both are plain ledger events, so they are covered by
the Merkle log and signed checkpoints like everything else.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from .log import Ledger


@dataclass(frozen=True)
class Clearance:
    status: str  # "passed" | "failed" | "overridden" | "unevaluated"
    detail: str
    report: str | None = None  # digest of the eval report behind the latest verdict

    @property
    def allowed(self) -> bool:
        return self.status in ("passed", "overridden")


def record_verdict(
    ledger: Ledger, adapter: str, report: str | None, passed: bool, gates: list[dict], run_id: str | None = None
) -> None:
    """``gates``: ``[{"name", "value", "threshold", "op", "passed"}, ...]``."""
    ledger.append(
        "gate.verdict", {"adapter": adapter, "report": report, "passed": bool(passed), "gates": gates, "run_id": run_id}
    )


def record_override(ledger: Ledger, adapter: str, by: str, reason: str) -> None:
    if not by.strip() or not reason.strip():
        raise InputError(
            "an override needs the name of the person taking responsibility and a reason",
            hint="--as 'Full Name' --reason '...'",
        )
    ledger.append("gate.override", {"adapter": adapter, "by": by, "reason": reason}, who=by, seal=True)


def clearance(ledger: Ledger, adapter: str) -> Clearance:
    """The latest verdict for ``adapter`` (a digest), with any override recorded after it."""
    verdict = None
    override = None
    for e in ledger.entries(type="gate.verdict"):
        if e.data["adapter"] == adapter:
            verdict, override = e, None
    if verdict is not None:
        for e in ledger.entries(start=verdict.seq, type="gate.override"):
            if e.data["adapter"] == adapter:
                override = e
    if verdict is None:
        return Clearance("unevaluated", "no evaluation with gates has been recorded for this adapter")
    if verdict.data["passed"]:
        return Clearance("passed", "all eval gates passed", verdict.data.get("report"))
    failed = [g["name"] for g in verdict.data.get("gates", []) if not g.get("passed")]
    if override is not None:
        return Clearance(
            "overridden",
            f"gates {', '.join(failed)} failed; overridden by {override.data['by']}: {override.data['reason']}",
            verdict.data.get("report"),
        )
    return Clearance("failed", f"eval gates failed: {', '.join(failed) or 'unknown'}", verdict.data.get("report"))
