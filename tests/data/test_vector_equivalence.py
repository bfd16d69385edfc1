"""The vectorised cleaning of a batch equals the per-row reference, row by row, on a corpus made to
trip it: personal data of every built-in kind at text edges, next to word characters and dashes,
in non-ASCII rows, with near-duplicates and exact duplicates (same rows kept, same redactions, same
counts and examples, same exact keys and MinHash sketches, hence the same near-duplicate decisions)."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pytest

from finetrace.data import pii
from finetrace.data.arrowtext import pa_strings
from finetrace.data.batches import Chunk, Ctx, process
from finetrace.data.clean import MinHasher, exact_key, normalize_row
from finetrace.data.compiled import available as compiled_available

PII_BITS = [
    "jane.doe@example.com",
    "a@b.co",
    "x@y",
    "4111 1111 1111 1111",
    "4111-1111-1111-1111",
    "41111111111111112",
    "GB82 WEST 1234 5698 7654 32",
    "GB82WEST12345698765432",
    "DE89370400440532013000",
    "123-45-6789",
    "000-12-3456",
    "192.168.0.1",
    "256.1.1.1",
    "1.2.3.4.5",
    "2001:db8::1",
    "fe80::",
    "::1",
    "+1 555-123-4567",
    "(555) 123-4567",
    "555.123.4567",
    "+44 (20) 7946 0958",
    "+49 30 1234",
    "ticket 12345678",
    "2024-01-02",
    "v1.2.3",
    "a:b:c:d",
    "١٢٣-٤٥-٦٧٨٩",
    "café@exämple.com",
]
GLUE = ["", " ", "x", "-", ".", "_", "+", ":", "(", "é", "\n", "1", "A", "@"]


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = "contract invoice refund naïve straße support order".split()
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 6)):
            parts.append(rng.choice(GLUE))
            parts.append(rng.choice(PII_BITS) if rng.random() < 0.5 else " ".join(rng.sample(words, 3)))
        parts.append(rng.choice(GLUE))
        out.append("".join(parts))
    return out


@pytest.mark.parametrize(
    "compiled", [False, pytest.param(True, marks=pytest.mark.skipif(not compiled_available(), reason="no numba"))]
)
def test_windowed_pii_scan_equals_the_whole_text_scan(compiled):
    texts = _texts(3000, 1) + PII_BITS + [g + b + h for b in PII_BITS for g in GLUE for h in ("", "x", "1", "-")]
    texts += ["", "@", "1" * 40]
    arr = pa_strings(texts)
    dets = pii.detectors()
    ascii_, per_det = pii.windows(arr, dets, compiled=compiled)
    if compiled:  # the compiled runs are the numpy ones, array for array
        want = pii.windows(arr, dets)[1]
        assert all(all(np.array_equal(x, y) for x, y in zip(g, w)) for g, w in zip(per_det, want))
    assert ascii_.tolist() == [t.isascii() for t in texts]
    for det, (row, start, end) in zip(dets, per_det):
        wins: dict = {}
        for r, a, b in zip(row.tolist(), start.tolist(), end.tolist()):
            wins.setdefault(r, []).append((a, b))
        for k, t in enumerate(texts):
            if ascii_[k]:
                assert det.find_in(t, wins.get(k, [])) == det.find(t), (det.name, t, wins.get(k))
    assert sum(1 for t in texts if pii.scan(t, dets)) > 1000  # the corpus is full of matches


def _corpus(n: int) -> list[dict]:
    rng = random.Random(7)
    texts = _texts(n, 2)
    rows = []
    for i, t in enumerate(texts):
        rows.append({"prompt": f"  case {i}\r\n{t}", "completion": rng.choice(texts)})
        if i % 9 == 0:
            rows.append(dict(rows[rng.randrange(len(rows))]))  # exact duplicate
        if i % 7 == 0:  # near duplicate: one word changed
            base = rows[rng.randrange(len(rows))]
            rows.append(
                {"prompt": base["prompt"].replace("case", "Case", 1) + " extra", "completion": base["completion"]}
            )
    return rows


def _reference(rows: list[dict], mode: str, m: MinHasher):
    """The per-row path: normalise, scan each field with every detector, redact, key, MinHash."""
    dets = pii.detectors()
    kept, errors, counts, examples, npii, normalized, keys, texts = [], [], {}, [], 0, 0, [], []
    for line, row in enumerate(rows, 1):
        row = dict(row)
        normalized += normalize_row(row, "completion")
        found = fail = False
        for f in ("prompt", "completion"):
            spans = pii.scan(row[f], dets)
            if not spans:
                continue
            kinds = ", ".join(sorted({s.type for s in spans}))
            if mode == "fail":
                errors.append((line, f, kinds))
                fail = True
                break
            found = True
            for s in spans:
                counts[s.type] = counts.get(s.type, 0) + 1
            if mode == "redact":
                row[f] = pii.redact(row[f], spans)
            if len(examples) < 20:
                examples.append((line, f, kinds))
        npii += found
        if fail:
            continue
        kept.append((line, row))
        keys.append(exact_key(row, "completion", ("prompt", "completion")))
        texts.append(row["prompt"] + "\n" + row["completion"])
    sketch, bands = m.sketch_and_bands(texts)
    return kept, errors, counts, examples, npii, normalized, np.asarray(keys, np.uint64), sketch, bands


@pytest.mark.parametrize(
    "compiled", [False, pytest.param(True, marks=pytest.mark.skipif(not compiled_available(), reason="no numba"))]
)
def test_batch_cleaning_equals_the_per_row_path(compiled):
    rows = _corpus(700)
    payload = "".join(json.dumps(r) + "\n" for r in rows).encode()
    m = MinHasher(0.8, None)
    for mode in ("redact", "flag", "fail"):
        ctx = Ctx("completion", {}, mode, 0.8, 1 << 20, compiled=compiled)
        got = process(Chunk("jsonl", 1, 0, payload), ctx)
        kept, errors, counts, examples, npii, normalized, keys, sketch, bands = _reference(rows, mode, m)
        table = got.arrow()
        assert got.lines.tolist() == [line for line, _ in kept]
        assert table.column("prompt").to_pylist() == [r["prompt"] for _, r in kept]
        assert table.column("completion").to_pylist() == [r["completion"] for _, r in kept]
        assert [(line, e.field, e.message) for line, e in got.errors] == [
            (line, f, f"contains personal data ({kinds})") for line, f, kinds in errors
        ]
        assert (got.pii_counts, got.pii_rows, got.normalized) == (counts, npii, normalized)
        assert got.pii_examples == examples
        assert np.array_equal(got.keys, keys) and np.array_equal(got.sketch, sketch)
        assert np.array_equal(got.bands, bands)
        assert isinstance(table, pa.Table) and table.num_rows == len(kept) > (100 if mode == "fail" else 700)
    kept, _, counts, *_ = _reference(rows, "redact", m)
    assert len(counts) == 6 and "[EMAIL]" in "".join(r["prompt"] for _, r in kept)  # every kind was found


@pytest.mark.slow  # two fresh interpreters and worker processes: ~5-9 s
def test_an_import_does_not_make_pyarrow_load_pandas(tmp_path):
    """pyarrow imports pandas (~2 s, ~50 MiB) on its first conversion of a Python scalar or list: the
    import builds its Arrow arrays from buffers instead, in this process and in worker processes."""
    import subprocess
    import sys
    from pathlib import Path

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _corpus(200)), encoding="utf-8")
    src = str(Path(__import__("finetrace").__file__).resolve().parents[1])
    code = (
        "import sys, json\nfrom finetrace.workspace import Workspace\nfrom finetrace.data import import_dataset\n"
        "ws = Workspace.init(sys.argv[2])\nfor w in (1, 2):\n"
        "    a = import_dataset(ws, [sys.argv[1]], f'r{w}', on_error='skip', workers=w)\n"
        "print(json.dumps({'pandas': 'pandas' in sys.modules, 'rows': a.metadata['rows_out']}))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(data), str(tmp_path / "ws")],
        capture_output=True,
        text=True,
        check=False,
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["pandas"] is False and out["rows"] > 100


def test_spill_files_do_not_change_the_written_bytes(workspace, tmp_path, monkeypatch):
    """Pass 2 re-slices the per-chunk spill files into fixed row groups of contiguous columns: the
    Parquet bytes (so the dataset digest) are the same whether a row group spans one spill file or many."""
    from finetrace.data import import_dataset, importer
    from finetrace.data import workers as W

    rng = random.Random(5)
    words = "contract invoice refund support order delivery".split()
    rows = [
        {
            "prompt": f"case {i} " + " ".join(rng.choice(words) for _ in range(rng.randint(500, 900))),
            "completion": f"answer {i}",
        }
        for i in range(700)
    ]  # ~5 KiB rows: row groups over a 1 MiB page
    p = tmp_path / "rows.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    monkeypatch.setattr(importer, "CHUNK_ROWS", 300)
    monkeypatch.setattr(W, "JSONL_CHUNK_BYTES", 1 << 24)  # one spill file
    one = import_dataset(workspace, [p], "one", on_error="skip", workers=1)
    monkeypatch.setattr(W, "JSONL_CHUNK_BYTES", 47_000)  # dozens, of uneven row counts
    many = import_dataset(workspace, [p], "many", on_error="skip", workers=1)
    assert many.digest == one.digest and one.metadata["rows_out"] == 700
