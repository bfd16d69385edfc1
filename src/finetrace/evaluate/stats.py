"""Uncertainty and fairness statistics over per-example results: seeded, exact where possible.

    bootstrap_ci(fn, n)                 percentile bootstrap interval of fn(indices) (default 95%)
    paired_bootstrap(fn_a, fn_b, n)     interval and two-sided p-value of fn_b - fn_a on shared resamples
    mcnemar_exact(correct_a, correct_b) exact two-sided McNemar p-value on the discordant pairs
    by_group(fn, groups)                metric per group value, with the max - min gap
    demographic_parity_difference       max over classes of (max_g - min_g) P(pred = c | group g)
    equalized_odds_difference           max over classes of max(TPR gap, FPR gap), one-vs-rest

Fairlearn's ``MetricFrame`` and its two differences are the reference for the definitions; we compute
them here (a dozen lines) rather than pull in fairlearn + scikit-learn + scipy, and because fairlearn's
differences are binary-only while our classification sets are multi-class: for a binary task with
``positive`` given they are exactly fairlearn's numbers (tested against hand-worked values).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

IndexFn = Callable[[Sequence[int]], float]


def _resamples(n: int, samples: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(n) for _ in range(n)] for _ in range(samples)]


def _percentile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of an already sorted list, q in [0, 1]."""
    if not sorted_vals:
        return float("nan")
    pos = (len(sorted_vals) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def bootstrap_ci(
    fn: IndexFn, n: int, samples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the statistic ``fn(indices)`` over ``n`` examples."""
    if n == 0:
        return (0.0, 0.0)
    vals = sorted(fn(idx) for idx in _resamples(n, samples, seed))
    alpha = (1 - confidence) / 2
    return (_percentile(vals, alpha), _percentile(vals, 1 - alpha))


def paired_bootstrap(
    fn_a: IndexFn, fn_b: IndexFn, n: int, samples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict:
    """Paired bootstrap of ``delta = fn_b - fn_a``: both metrics on the same resampled examples.

    The p-value is two-sided: twice the smaller share of resamples on either side of zero (with the
    +1 correction so it is never exactly 0), capped at 1.
    """
    if n == 0:
        return {"delta": 0.0, "ci": [0.0, 0.0], "p_value": 1.0, "test": "paired_bootstrap", "samples": 0}
    all_idx = list(range(n))
    delta = fn_b(all_idx) - fn_a(all_idx)
    deltas = sorted(fn_b(idx) - fn_a(idx) for idx in _resamples(n, samples, seed))
    le = sum(d <= 0 for d in deltas)
    ge = sum(d >= 0 for d in deltas)
    p = min(1.0, 2 * (min(le, ge) + 1) / (samples + 1))
    alpha = (1 - confidence) / 2
    return {
        "delta": delta,
        "ci": [_percentile(deltas, alpha), _percentile(deltas, 1 - alpha)],
        "p_value": p,
        "test": "paired_bootstrap",
        "samples": samples,
    }


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """Exact McNemar test: under H0 the discordant pairs split Binomial(b + c, 1/2)."""
    b = sum(1 for x, y in zip(correct_a, correct_b) if x and not y)  # only A right
    c = sum(1 for x, y in zip(correct_a, correct_b) if y and not x)  # only B right
    n = b + c
    if n == 0:
        return {"b": 0, "c": 0, "p_value": 1.0, "test": "mcnemar_exact"}
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return {"b": b, "c": c, "p_value": min(1.0, 2 * tail), "test": "mcnemar_exact"}


def group_indices(groups: Sequence[str | None]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        if g is not None:
            out.setdefault(str(g), []).append(i)
    return dict(sorted(out.items()))


def by_group(fn: IndexFn, groups: Sequence[str | None]) -> dict:
    """``{"groups": {g: {"value", "n"}}, "gap": max - min}`` (MetricFrame.by_group and .difference())."""
    per = {g: {"value": fn(idx), "n": len(idx)} for g, idx in group_indices(groups).items()}
    vals = [v["value"] for v in per.values()]
    return {"groups": per, "gap": (max(vals) - min(vals)) if len(vals) > 1 else 0.0}


def _rate(values: list[bool]) -> float:
    return sum(values) / len(values) if values else 0.0


def _classes(preds, golds, positive):
    if positive is not None:
        return [positive]
    return sorted({g for g in golds} | {p for p in preds if p is not None})


def demographic_parity_difference(
    preds: Sequence[str | None], golds: Sequence[str], groups: Sequence[str | None], positive: str | None = None
) -> float:
    """Largest gap between groups in the rate of predicting a class (max over classes, or ``positive``)."""
    gi = group_indices(groups)
    if len(gi) < 2:
        return 0.0
    worst = 0.0
    for c in _classes(preds, golds, positive):
        rates = [_rate([preds[i] == c for i in idx]) for idx in gi.values()]
        worst = max(worst, max(rates) - min(rates))
    return worst


def equalized_odds_difference(
    preds: Sequence[str | None], golds: Sequence[str], groups: Sequence[str | None], positive: str | None = None
) -> float:
    """max over classes (one-vs-rest) of max(TPR gap, FPR gap) between groups; groups with no
    positives (negatives) of a class are left out of that class's TPR (FPR) gap."""
    gi = group_indices(groups)
    if len(gi) < 2:
        return 0.0
    worst = 0.0
    for c in _classes(preds, golds, positive):
        tprs, fprs = [], []
        for idx in gi.values():
            pos = [i for i in idx if golds[i] == c]
            neg = [i for i in idx if golds[i] != c]
            if pos:
                tprs.append(_rate([preds[i] == c for i in pos]))
            if neg:
                fprs.append(_rate([preds[i] == c for i in neg]))
        gaps = [max(v) - min(v) for v in (tprs, fprs) if len(v) > 1]
        if gaps:
            worst = max(worst, max(gaps))
    return worst
