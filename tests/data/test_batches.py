"""Pass 1 in record batches: the vectorised path equals the per-row reference, whatever the chunking,
in this process or in worker processes (same digests, same counts, same errors and their lines)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from finetrace.data import import_dataset, open_dataset
from finetrace.data import workers as W
from finetrace.data.arrowtext import normalize_array, pa_strings, prepare_texts
from finetrace.data.clean import MinHasher, normalize_text
from finetrace.data.compiled import available as compiled_available


def _awkward_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = "ab c\tDE\n\r\x0b\x1cé\u00a0ß İ\u2003x"
    out = ["", " ", "ab", "  lead", "trail \r\n", "a\x1cb", "Ünï  cödé", "x" * 600 + "é"]
    out += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 700))) for _ in range(n)]
    return out


def test_vectorised_text_work_equals_the_per_row_functions(tmp_path):
    texts = _awkward_texts(300)
    arr, changed = normalize_array(pa_strings(texts), normalize_text)
    assert arr.to_pylist() == [normalize_text(t) for t in texts]
    assert changed.tolist() == [normalize_text(t) != t for t in texts]
    data, offs = prepare_texts(pa_strings(texts))
    got = [bytes(data[offs[i] : offs[i + 1]]) for i in range(len(texts))]
    assert got == [(" ".join(t.lower().split()).encode() or b" ").ljust(5) for t in texts]
    m = MinHasher(0.8, None)
    few = texts[:40]  # the pure-Python reference is slow: the awkward ones and a long one
    assert np.array_equal(m.signatures(few), _reference_signatures(m, few))


def _reference_signatures(m, texts):
    """The straightforward per-text MinHash (every shingle, every permutation) the blocked one must equal."""
    out = np.full((len(texts), m.num_perm), np.iinfo(np.uint32).max, np.uint32)
    for k, t in enumerate(texts):
        b = (" ".join(t.lower().split()).encode() or b" ").ljust(5)
        for p in range(len(b) - 4):
            h = 0
            for c in b[p : p + 5]:
                h = (h * 16777619 + c) & 0xFFFFFFFF
            h ^= h >> 15
            h = (h * 0x2C1B3C6D) & 0xFFFFFFFF
            h ^= h >> 12
            if len(b) > 512 and h & 7:
                continue
            v = (m.a32.astype(np.uint64) * h + m.b32) & 0xFFFFFFFF
            out[k] = np.minimum(out[k], v.astype(np.uint32))
    return out


def _rows(n: int) -> list[str]:
    rng = random.Random(3)
    words = "alpha beta gamma delta invoice refund café naïve".split()
    lines = []
    for i in range(n):
        p = " ".join(rng.choice(words) for _ in range(rng.randint(3, 30)))
        if i % 9 == 0:
            p += f" mail user{i}@example.org or +44 20 7946 {i:04d}"
        lines.append(json.dumps({"prompt": ("  " if i % 5 == 0 else "") + p, "completion": f"a{i % 40}", "id": i}))
        if i % 17 == 0:
            lines.append(lines[-1])  # exact duplicate
        if i % 23 == 0:
            lines.append('{"prompt": "broken')  # invalid JSON, skipped
        if i % 29 == 0:
            lines.append(json.dumps({"prompt": 5, "completion": "x"}))  # wrong type, skipped
    return lines


@pytest.mark.parametrize(
    "workers,chunk,compiled",
    [
        (1, 2048, False),
        pytest.param(2, 4096, False, marks=pytest.mark.slow),
        # workers forked after loading the numba kernels (skipped where numba is not installed)
        pytest.param(
            2,
            4096,
            True,
            marks=[pytest.mark.slow, pytest.mark.skipif(not compiled_available(), reason="numba not installed")],
        ),
    ],
)
def test_chunking_and_workers_do_not_change_the_dataset(workspace, tmp_path, monkeypatch, workers, chunk, compiled):
    p = tmp_path / "rows.jsonl"
    p.write_text("\n".join(_rows(400)) + "\n", encoding="utf-8")
    ref = import_dataset(workspace, [p], "ref", on_error="skip", workers=1)
    monkeypatch.setattr(W, "JSONL_CHUNK_BYTES", chunk)
    monkeypatch.setattr(W, "COMPILED_MIN_BYTES", 0 if compiled else 1 << 60)
    with W.Pool(workers, p.stat().st_size, []) as pool:
        assert pool.compiled is compiled
    got = import_dataset(workspace, [p], "got", on_error="skip", workers=workers)
    assert got.digest == ref.digest  # same rows, splits, counts, PII, duplicates, examples
    _, info, _ = open_dataset(workspace, got.ref)
    assert info["skipped"] == {"invalid_json": 18, "wrong_type": 14}
    assert info["skipped_examples"]["invalid_json"][0].startswith(f"{p}:3: truncated JSON")


def test_worker_frames_rebuild_only_data_classes():
    """A frame naming any other class (os.system, say) is refused, never imported or called."""
    import os
    import pickle

    import numpy as np

    ok = W._Frames.load(pickle.dumps((True, {"a": np.arange(3), "s": {1, 2}})))
    assert ok[0] is True and ok[1]["a"].tolist() == [0, 1, 2] and ok[1]["s"] == {1, 2}

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    with pytest.raises(pickle.UnpicklingError, match="may not hold"):
        W._Frames.load(pickle.dumps(Evil()))


def test_jsonl_blocks_of_a_plain_file_are_those_jsonl_chunks_reads(tmp_path):
    """The parent cuts a plain JSONL file into blocks by offset and length (the workers read the bytes):
    the same first lines, offsets and lengths as reading the blocks, over-long lines (one straddling a
    block's end, one past the end of the file) reported at the same line, a BOM skipped."""
    from finetrace.data.readers import ReadOptions, jsonl_chunks

    rng = random.Random(3)
    p = tmp_path / "f.jsonl"
    too_long = blocks = 0
    for case in range(150):
        lines = [b"x" * rng.choice([0, 1, 5, 50, 1023, 1024, 1025, 3000]) for _ in range(rng.randint(0, 25))]
        data = (b"\xef\xbb\xbf" if case % 7 == 0 else b"") + b"\n".join(lines) + (b"\n" if case % 2 else b"")
        p.write_bytes(data)
        for size in (64, 1024, 4096):
            opts = ReadOptions(1024, "f.jsonl")
            want = [(ln, off, len(b) if b is not None else 0, r) for ln, off, b, r in jsonl_chunks(p, opts, size)]
            assert list(W._jsonl_spans(p, opts, size)) == want
            too_long += sum(r is not None for *_, r in want)
            blocks += sum(r is None for *_, r in want)
    assert too_long > 50 and blocks > 500  # both kinds were compared, many times
