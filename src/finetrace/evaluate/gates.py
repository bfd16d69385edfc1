"""Apply a suite's gates to one evaluated model's results: one row per gate, and the verdict.

Each row is ``{"name", "value", "threshold", "op", "passed", "note"}`` (the shape
``ledger.clearance.record_verdict`` stores). A gate whose quantity was not measured (e.g. ``min_gain``
with no base comparison, ``max_flip_rate`` with the bias suite off) fails: a gate is a claim that a
number was checked, and an unmeasured number was not.
"""

from __future__ import annotations

from .suite import Gates


def _row(name: str, value: float | None, threshold: float, op: str, note: str = "") -> dict:
    if value is None:
        return {
            "name": name,
            "value": None,
            "threshold": threshold,
            "op": op,
            "passed": False,
            "note": note or "not measured",
        }
    ok = value >= threshold if op == ">=" else value <= threshold
    return {"name": name, "value": value, "threshold": threshold, "op": op, "passed": bool(ok), "note": note}


# duplicates: alike within on purpose (one gate row per threshold).
def apply_gates(gates: Gates, result: dict, primary: str) -> list[dict]:
    """``result`` is one entry of a report's ``models`` list (see ``runner``)."""
    rows = []
    for m, thr in gates.min_metric.items():
        v = result["metrics"].get(m, {}).get("value")
        rows.append(_row(f"min_metric:{m}", v, thr, ">=", "" if v is not None else f"{m} not computed"))
    for m, thr in gates.min_gain.items():
        v = (result.get("vs_base") or {}).get(m, {}).get("delta")
        rows.append(_row(f"min_gain:{m}", v, thr, ">=", "" if v is not None else "no base comparison"))
    bias = result.get("bias")
    if gates.max_flip_rate is not None:
        rows.append(
            _row(
                "max_flip_rate",
                bias["flip_rate"] if bias else None,
                gates.max_flip_rate,
                "<=",
                "" if bias else "bias suite not run",
            )
        )
    if gates.max_group_gap is not None:
        gaps = []
        grp = (result.get("groups") or {}).get(primary)
        if grp and len(grp["groups"]) > 1:
            gaps.append(grp["gap"])
        if bias:
            gaps.append(bias["group_gap"])
        rows.append(
            _row(
                "max_group_gap",
                max(gaps) if gaps else None,
                gates.max_group_gap,
                "<=",
                "" if gaps else "no group column and no bias suite",
            )
        )
    if gates.max_perplexity_increase is not None:
        fg = result.get("forgetting")
        rows.append(
            _row(
                "max_perplexity_increase",
                fg["increase"] if fg else None,
                gates.max_perplexity_increase,
                "<=",
                "" if fg else "no forgetting check",
            )
        )
    return rows


def verdict(rows: list[dict]) -> bool:
    return all(r["passed"] for r in rows)
