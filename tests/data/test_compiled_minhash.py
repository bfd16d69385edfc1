"""The numba MinHash loop (``data/compiled.py``, the ``fast`` extra) gives the numpy path's signatures bit
for bit (hence the reference's), on awkward, short, long and sliced rows, and an import that uses it
writes the same dataset; without numba the numpy path is used (the checks against numba are skipped where
it is not installed)."""

from __future__ import annotations

import numpy as np
import pytest

from finetrace.data import compiled, import_dataset
from finetrace.data import workers as W
from finetrace.data.arrowtext import pa_strings, prepare_texts, signatures
from finetrace.data.clean import MinHasher

from . import minhash_reference as ref
from .test_batches import _awkward_texts, _reference_signatures, _rows
from .test_minhash_equivalence import _rows as _minhash_rows

_numba = pytest.mark.skipif(not compiled.available(), reason="numba is not installed (the `fast` extra)")


def needs_numba(test):
    """Skipped without numba; slow with it (the first call JIT-compiles the loops, ~3 s)."""
    return pytest.mark.slow(_numba(test))


@needs_numba
@pytest.mark.parametrize("runs", [0.0, 0.9])
def test_compiled_preparation_and_signatures_equal_numpy_and_the_reference(runs):
    texts = _minhash_rows(400, seed=7, runs=runs) + _awkward_texts(200)
    m = MinHasher(0.8, None)
    prepared = prepare_texts(pa_strings(texts))
    for part in (pa_strings(texts), pa_strings(texts).slice(5, 300), pa_strings([t for t in texts if t.isascii()])):
        want_data, want_offs = prepare_texts(part)
        got_data, got_offs = compiled.prepare_texts(part)
        assert np.array_equal(got_offs, want_offs) and np.array_equal(got_data, want_data)
    got = compiled.signatures(prepared, m.a32, m.b32)
    assert got.dtype == np.uint32 and got.shape == (len(texts), 64)
    assert np.array_equal(got, signatures(prepared, m.a32, m.b32))
    assert np.array_equal(got, ref.signatures(ref.prepare_texts(pa_strings(texts)), m.a32, m.b32))
    few = texts[-40:]  # the per-text definition, every shingle spelt out
    assert np.array_equal(
        compiled.signatures(prepare_texts(pa_strings(few)), m.a32, m.b32), _reference_signatures(m, few)
    )
    # a slice (non-zero offsets into the buffers), and no rows at all
    d, o = prepare_texts(pa_strings(texts).slice(11, 90))
    assert np.array_equal(compiled.signatures((d, o), m.a32, m.b32), got[11:101])
    assert compiled.signatures((np.zeros(0, np.uint8), np.zeros(1, np.int64)), m.a32, m.b32).shape == (0, 64)


@needs_numba
def test_compiled_sketch_and_bands_equal_numpy():
    texts = _minhash_rows(300, seed=3, runs=0.2)
    fast, slow = MinHasher(0.8, None, compiled=True), MinHasher(0.8, None)
    assert fast.compiled and not slow.compiled
    for a, b in zip(fast.sketch_and_bands(texts), slow.sketch_and_bands(texts)):
        assert np.array_equal(a, b)


@needs_numba
def test_an_import_with_the_compiled_loop_writes_the_same_dataset(workspace, tmp_path, monkeypatch):
    p = tmp_path / "rows.jsonl"
    p.write_text("\n".join(_rows(400)) + "\n", encoding="utf-8")
    monkeypatch.setattr(W, "COMPILED_MIN_BYTES", 1 << 60)
    with W.Pool(1, p.stat().st_size, []) as pool:
        assert not pool.compiled
    want = import_dataset(workspace, [p], "numpy", on_error="skip", workers=1)
    monkeypatch.setattr(W, "COMPILED_MIN_BYTES", 0)  # every input counts as large: numba in use
    with W.Pool(1, p.stat().st_size, []) as pool:
        assert pool.compiled
    got = import_dataset(workspace, [p], "numba", on_error="skip", workers=1)
    assert got.digest == want.digest and got.metadata["rows_out"] == want.metadata["rows_out"] > 300


def test_without_numba_the_numpy_loop_is_used(monkeypatch):
    monkeypatch.setattr(compiled, "_KERNEL", [None])  # as when importing numba failed
    m = MinHasher(0.8, None, compiled=True)
    assert not m.compiled
    texts = _minhash_rows(50, seed=1, runs=0.1)
    for a, b in zip(m.sketch_and_bands(texts), MinHasher(0.8, None).sketch_and_bands(texts)):
        assert np.array_equal(a, b)


@needs_numba
def test_compiled_pii_gates_equal_the_numpy_gates():
    from finetrace.data import pii
    from finetrace.data.arrowtext import str_buffers

    from .test_vector_equivalence import GLUE, PII_BITS, _texts

    edge = ["", "AB12", "AB1", "A", "::", ":", "1.2.3", "@", "Ab12", "AB 12"]  # row ends cut patterns
    texts = _texts(1500, 4) + [g + b + h for b in PII_BITS for g in GLUE for h in ("", "1", ":")] + edge
    arr = pa_strings(texts)
    want = pii._gates(*str_buffers(arr))
    got = compiled.pii_gates(*str_buffers(arr))
    assert len(got) == len(want) == len(pii.BUILTIN)
    for g, w in zip(got, want):
        assert g.dtype == bool and np.array_equal(g, w)
    assert all(w.any() and not w.all() for w in want)  # every gate both passes and stops rows here
    dets = pii.detectors()
    for g, w in zip(pii.gates(arr, dets, compiled=True), pii.gates(arr, dets)):
        assert np.array_equal(g, w)
    empty = pa_strings([])
    assert [len(g) for g in compiled.pii_gates(*str_buffers(empty))] == [0] * len(pii.BUILTIN)
