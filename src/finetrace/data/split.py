"""Train/validation/test assignment: deterministic from a seed, stratified, leak-free.

Rows are assigned by *unit*: a unit is a ``group`` value, or a near-duplicate cluster, or a lone row, so
rows that must stay together (same group, near-duplicates) always land in the same split. Within each
stratum (the label for classification, else one stratum) units are ordered by a keyed hash of their
content key and the seed, and the first ``round(n * test)`` rows go to test, the next
``round(n * validation)`` to validation, the rest to train. The order depends only on content and seed,
not on the input order, and only 8-byte arrays per row are held (no rows).

A held-out test file bypasses this: its rows are the test split; the fractions of the others are
renormalised over train and validation.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

TRAIN, VALIDATION, TEST, DROP = 0, 1, 2, -1
SPLIT_NAMES = {TRAIN: "train", VALIDATION: "validation", TEST: "test"}


def check_fractions(splits) -> tuple[float, float, float]:
    try:
        fr = tuple(float(x) for x in splits)
    except (TypeError, ValueError):
        raise ConfigError(f"bad split fractions {splits!r}", hint="three numbers: train, validation, test") from None
    if len(fr) != 3 or any(x < 0 for x in fr) or abs(sum(fr) - 1) > 1e-6 or fr[0] <= 0:
        raise ConfigError(
            f"bad split fractions {splits!r}",
            hint="three non-negative numbers (train > 0) that sum to 1, e.g. 0.8,0.1,0.1",
        )
    return fr  # type: ignore[return-value]


def _mix(x: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of ``x`` keyed by ``seed`` (vectorised): a stable pseudo-random order."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (1 << 64))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def assign(
    units: np.ndarray,
    unit_keys: np.ndarray,
    strata: np.ndarray,
    fractions: tuple[float, float, float],
    seed: int,
    forced_test: np.ndarray | None = None,
) -> np.ndarray:
    """Split code per row (TRAIN/VALIDATION/TEST).

    units[i]      the unit (root row index) of row i; rows of a unit share its split
    unit_keys[i]  a stable 64-bit content key of row i (the unit's root key is used for ordering)
    strata[i]     the stratum of row i (the unit's root stratum is used)
    forced_test   rows from a held-out test file (already TEST; others get train/validation only)
    """
    n = len(units)
    out = np.full(n, TRAIN, np.int8)
    if n == 0:
        return out
    train, val, test = fractions
    if forced_test is not None and forced_test.any():
        out[forced_test] = TEST
        test, val = 0.0, val / (train + val)
        todo = ~forced_test
    else:
        todo = np.ones(n, bool)
    rows = np.flatnonzero(todo)
    root = units[rows]
    uroots, sizes = np.unique(root, return_counts=True)
    order_key = _mix(unit_keys[uroots], seed)
    ustrata = strata[uroots]
    unit_split = np.full(len(uroots), TRAIN, np.int8)
    for s in np.unique(ustrata):
        idx = np.flatnonzero(ustrata == s)
        idx = idx[np.lexsort((uroots[idx], order_key[idx]))]
        total = int(sizes[idx].sum())
        n_test, n_val = int(round(total * test)), int(round(total * val))
        before = np.cumsum(sizes[idx]) - sizes[idx]  # rows placed before this unit
        unit_split[idx[before < n_test]] = TEST
        unit_split[idx[(before >= n_test) & (before < n_test + n_val)]] = VALIDATION
    out[rows] = unit_split[np.searchsorted(uroots, root)]
    return out
