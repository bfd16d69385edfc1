"""The batch MinHash equals the frozen pre-rewrite implementation (``minhash_reference``) bit for bit on
random rows: unicode, short, blank, whitespace-heavy and long rows, batches where a few rows hold runs of
whitespace and batches where most do, and sliced Arrow arrays; hence the same near-duplicate pairs."""

from __future__ import annotations

import random

import numpy as np
import pytest

from finetrace.data.arrowtext import pa_strings, prepare_texts, signatures
from finetrace.data.clean import MinHasher

from . import minhash_reference as ref

WORDS = "contract invoice refund naïve straße support order café Ünï İx ß".split()
SPACES = [" ", "  ", "\t", "\n\n", "\r\n", "\x0b", "\x1c", "\u00a0", "\u2003", " \t "]


def _rows(n: int, seed: int, runs: float) -> list[str]:
    """Random texts; ``runs``: the share of rows with whitespace runs inside them."""
    rng = random.Random(seed)
    out = ["", " ", "a", "abcd", "ABCDE", "  x  ", "é", "\t\n", "x" * 513, "Y" * 600 + " é"]
    for _ in range(n):
        k = rng.choice([1, 2, 5, 40, 90, 200])
        words = [rng.choice(WORDS) if rng.random() < 0.3 else rng.choice(["alpha", "BETA", "gamma"]) for _ in range(k)]
        sep = (lambda: rng.choice(SPACES)) if rng.random() < runs else (lambda: " ")
        text = "".join(w + sep() for w in words)[:-1]
        if rng.random() < 0.1:
            text = rng.choice(SPACES) + text
        if rng.random() < 0.1:
            text += rng.choice(SPACES)
        if rng.random() < 0.5:  # ASCII only
            text = text.encode("ascii", "ignore").decode()
        out.append(text)
    return out


@pytest.mark.parametrize("runs", [0.0, 0.05, 0.9])
def test_batch_minhash_equals_the_reference(runs):
    texts = _rows(400, seed=int(runs * 100), runs=runs)
    m = MinHasher(0.8, None)
    arr = pa_strings(texts)
    got_data, got_offs = prepare_texts(arr)
    want_data, want_offs = ref.prepare_texts(arr)
    assert np.array_equal(got_offs, want_offs) and np.array_equal(got_data, want_data)
    assert np.array_equal(
        signatures((got_data, got_offs), m.a32, m.b32), ref.signatures((want_data, want_offs), m.a32, m.b32)
    )
    sketch, bands = m.sketch_and_bands(texts)
    want_sketch, want_bands = ref.sketch_and_bands(m, texts)
    assert np.array_equal(sketch, want_sketch) and np.array_equal(bands, want_bands)
    # a slice of a larger array (non-zero offset into the buffers) gives the rows' own results
    part = arr.slice(7, 150)
    d, o = prepare_texts(part)
    assert np.array_equal(
        signatures((d, o), m.a32, m.b32), ref.signatures(ref.prepare_texts(pa_strings(texts[7:157])), m.a32, m.b32)
    )


def test_near_duplicate_pairs_equal_the_reference(tmp_path):
    rng = random.Random(9)
    base = _rows(300, seed=4, runs=0.2)
    texts = []
    for t in base:  # near copies: one word changed, case and spacing changed, or left alone
        texts.append(t)
        if rng.random() < 0.3:
            w = t.split()
            if w:
                w[rng.randrange(len(w))] = "changed"
            texts.append(rng.choice(["  ", "\t"]).join(w).upper())
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    got = MinHasher(0.8, tmp_path / "a")
    got.add(texts[:200])
    got.add(texts[200:])
    want = MinHasher(0.8, tmp_path / "b")
    want.write(*ref.sketch_and_bands(want, texts))
    active = np.ones(len(texts), bool)
    active[::11] = False
    pairs = got.pairs(active)
    assert pairs == want.pairs(active) and len(pairs) > 20


@pytest.mark.parametrize("perm", [64, 8, 12])
def test_equal_fraction_is_the_mean_of_equal_slots(perm):
    """The word-wise count of equal sketch bytes gives the very floats of ``(a == b).mean(axis=1)``:
    every count from 0 to P equal slots, with P a multiple of 8 (words) or not (the plain formula)."""
    from finetrace.data.clean import equal_fraction

    rng = np.random.default_rng(perm)
    base = rng.integers(0, 256, (1, perm), dtype=np.uint8)
    rows = [base[0].copy()]
    for k in range(perm + 1):  # a row with exactly k slots changed, at random places and by random amounts
        r = base[0].copy()
        at = rng.choice(perm, k, replace=False)
        r[at] = (r[at].astype(np.int64) + rng.integers(1, 256, k)) % 256
        rows.append(r)
    sigs = np.concatenate([np.stack(rows), rng.integers(0, 3, (500, perm), dtype=np.uint8)])
    a = np.concatenate([np.zeros(len(rows), np.int64), rng.integers(0, len(sigs), 5000)])
    b = np.concatenate([np.arange(len(rows)), rng.integers(0, len(sigs), 5000)])
    want = (sigs[a] == sigs[b]).mean(axis=1)
    got = equal_fraction(sigs, a, b)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    assert sorted(set(want[: len(rows)].tolist())) == [k / perm for k in range(perm + 1)]
