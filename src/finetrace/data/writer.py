"""Pass 2 of an import (``importer.import_dataset`` calls it): the dataset folder written from pass 1's
kept rows and decisions (train/validation/test Parquet files, ``dataset.json``, ``datasheet.json`` with
the measured token lengths), and the exact, ordered list of transforms recorded in the run config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from ..atomic import write_text
from .arrowtext import np_bools
from .clean import lsh_params
from .datasheet import build as build_sheet
from .schemas import OPTIONAL_COLUMNS, SCHEMAS, SPLITS, to_example
from .split import SPLIT_NAMES, TRAIN

if TYPE_CHECKING:
    from .importer import _Decisions, _Layout, _Pass1

DATASET_FORMAT = "finetrace-dataset/1"
TOKEN_BINS = [0, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]


def _kept_rows(spills: list, rows: int):
    """The kept rows of pass 1 as tables of ``rows`` rows (the last one shorter), read back from the
    spill files one at a time (memory-mapped), so the written row groups do not depend on chunking."""
    import pyarrow as pa

    carry = None
    for path in spills:
        table = pa.ipc.open_file(pa.memory_map(path)).read_all()  # the map lives as long as its buffers
        if carry is not None:
            table = pa.concat_tables([carry, table])
        start = 0
        while table.num_rows - start >= rows:
            yield _contiguous(table.slice(start, rows))
            start += rows
        carry = table.slice(start) if start < table.num_rows else None
        Path(path).unlink()  # read: its pages need not stay in the page cache's dirty set
    if carry is not None and carry.num_rows:
        yield _contiguous(carry)


def _contiguous(table):
    """One chunk per column, as a batch read from Parquet was: the pages written (so the bytes and the
    dataset digest) depend on it."""
    return table.combine_chunks() if any(c.num_chunks > 1 for c in table.columns) else table


def _write_splits(out: Path, p1: _Pass1, split: np.ndarray, keep_cols: list[str], chunk_rows: int) -> None:
    """Stream the kept rows into one zstd Parquet file per split, ``chunk_rows`` rows per row group.
    The Parquet encoding runs in two threads (it releases the GIL), one for the train split and one
    for the others, while this one reads and filters the next rows; each file's writes keep their
    order, so the bytes are those of writing in this thread."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    writers: dict[int, pq.ParquetWriter] = {}
    lanes = [ThreadPoolExecutor(1, thread_name_prefix=f"finetrace-parquet{i}") for i in range(2)]
    pending: list[deque] = [deque(), deque()]
    offset = 0
    try:
        for table in _kept_rows(p1.spills, chunk_rows):
            codes = split[offset : offset + table.num_rows]
            offset += table.num_rows
            table = table.select(keep_cols)
            for code, name in SPLIT_NAMES.items():
                mask = codes == code
                if not mask.any():
                    continue
                if code not in writers:
                    writers[code] = pq.ParquetWriter(out / f"{name}.parquet", table.schema, compression="zstd")
                lane = 0 if code == TRAIN else 1  # one thread per file: its row groups stay in order
                while len(pending[lane]) >= WRITE_AHEAD:
                    pending[lane].popleft().result()  # re-raises a failed write here
                pending[lane].append(lanes[lane].submit(writers[code].write_table, table.filter(np_bools(mask))))
        for q in pending:
            while q:
                q.popleft().result()
    finally:
        for q in pending:
            for f in q:
                f.cancel()
        for pool in lanes:
            pool.shutdown(wait=True)
        for w in writers.values():
            w.close()


WRITE_AHEAD = 2  # filtered tables queued per Parquet thread: memory stays a few row groups


def _label_counts(p1: _Pass1, split: np.ndarray) -> dict:
    """Rows per label in each split (classification)."""
    lab = np.frombuffer(p1.label, np.int64)
    names_by_idx = {v: k for k, v in p1.labels.items()}
    label_counts = {}
    for code, name in SPLIT_NAMES.items():
        bc = np.bincount(lab[split == code], minlength=len(p1.labels))
        label_counts[name] = {names_by_idx[i]: int(c) for i, c in enumerate(bc) if c}
    return label_counts


# duplicates: alike data/importer.py:import_dataset on purpose (a call of write_dataset and its signature).
def write_dataset(
    out: Path,
    p1: _Pass1,
    d: _Decisions,
    sources,
    schema,
    dropped,
    given,
    transforms,
    fractions,
    seed,
    pii,
    threshold,
    ws,
    tokenizer,
    chunk_rows: int,
    prompt_format: str | None = None,
) -> dict:
    """Write the dataset folder ``out`` (split Parquet files, dataset.json, datasheet.json); return dataset.json."""
    out.mkdir(parents=True)
    keep_cols = list(SCHEMAS[schema]) + [c for c, has in (("id", p1.has_id), ("group", p1.has_group)) if has]
    layout = cast("_Layout", p1.layout)  # set by pass 1
    if layout.tools:
        keep_cols.insert(1, "tools")
    counts = {name: int((d.split == code).sum()) for code, name in SPLIT_NAMES.items()}
    _write_splits(out, p1, d.split, keep_cols, chunk_rows)

    labels = sorted(p1.labels) if schema == "classification" else None
    label_counts = _label_counts(p1, d.split) if labels is not None else None
    rows_in = sum(s.rows_read for s in sources)
    rows_out = sum(counts.values())
    dup = {
        "exact": int(d.dropped.get("exact_duplicate", 0) + d.dropped.get("duplicate_of_test", 0)),
        "near": d.near_pairs,
        "near_clusters": d.near_clusters,
        "threshold": threshold,
        "exact_examples": d.dup_examples,
        "near_examples": d.near_examples,
    }
    pii_info = {
        "mode": pii,
        "counts": dict(sorted(p1.pii_counts.items())),
        "rows": p1.pii_rows,
        "examples": p1.pii_examples,
    }
    prompt_format = prompt_format if schema == "classification" else None
    token_lengths = _token_lengths(ws, tokenizer, out, schema, labels, prompt_format) if tokenizer else None
    measured = {
        "schema": schema,
        "rows_in": rows_in,
        "rows_out": rows_out,
        "splits": counts,
        "labels": label_counts,
        "skipped": p1.skipped,
        "dropped": d.dropped,
        "duplicates": dup,
        "pii": pii_info,
        "normalized_rows": p1.normalized,
        "dropped_columns": sorted(map(str, dropped)),
        "token_lengths": token_lengths,
    }
    sheet = build_sheet(given, measured)
    info = {
        "format": DATASET_FORMAT,
        "schema": schema,
        "columns": keep_cols,
        "labels": labels,
        **({"prompt_format": prompt_format} if prompt_format else {}),
        "counts": counts,
        "label_counts": label_counts,
        "rows_in": rows_in,
        "rows_out": rows_out,
        "rows_valid": sum(s.rows_valid for s in sources),
        "skipped": p1.skipped,
        "skipped_examples": p1.skipped_examples,
        "dropped": d.dropped,
        "duplicates": dup,
        "pii": pii_info,
        "normalized_rows": p1.normalized,
        "dropped_columns": measured["dropped_columns"],
        "seed": seed,
        "fractions": list(fractions),
        "sources": [
            {
                "file": s.path.name,
                "digest": s.digest,
                "format": s.fmt,
                "role": "test" if s.test else "data",
                "rows_read": s.rows_read,
                "rows_valid": s.rows_valid,
            }
            for s in sources
        ],
        "transforms": transforms,
        "gaps": sheet["gaps"],
    }
    if layout.fmt != "native":  # native imports keep exactly the fields (and digests) they always had
        info["input_format"] = layout.fmt
        info["tools"] = layout.tools
    write_text(out / "dataset.json", json.dumps(info, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    write_text(
        out / "datasheet.json", json.dumps(sheet, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"
    )
    return info


def _token_lengths(ws, tokenizer: str, folder: Path, schema: str, labels, prompt_format: str | None) -> dict:
    """Histogram of prompt+target token counts (text only; chat-template tokens excluded)."""
    import pyarrow.parquet as pq

    path = Path(tokenizer)
    if not path.is_dir():
        from ..models import model_path

        path, _ = model_path(ws, tokenizer)
    if (path / "tokenizer.json").is_file():  # the fast path: the tokenizers library alone
        from tokenizers import Tokenizer

        raw = Tokenizer.from_file(str(path / "tokenizer.json"))

        def encode(texts):
            return [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)]
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)

        def encode(texts):
            return tok(texts, add_special_tokens=False)["input_ids"]

    lengths: list[int] = []
    for name in SPLITS:
        f = folder / f"{name}.parquet"
        if not f.exists():
            continue
        for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
            texts = []
            for row in batch.to_pylist():
                ex = to_example(row, schema, labels, prompt_format)
                texts.append("\n".join(m["content"] for m in ex.messages) + "\n" + ex.target)
            lengths.extend(len(ids) for ids in encode(texts))
    arr = np.asarray(lengths)
    edges = TOKEN_BINS + [np.inf]
    hist, _ = np.histogram(arr, bins=edges)
    return {
        "tokenizer": tokenizer,
        "count": int(len(arr)),
        "min": int(arr.min()),
        "max": int(arr.max()),
        "mean": round(float(arr.mean()), 2),
        "p50": int(np.percentile(arr, 50)),
        "p95": int(np.percentile(arr, 95)),
        "histogram": {
            f"{lo}-{hi - 1 if hi != np.inf else 'inf'}": int(c) for lo, hi, c in zip(edges[:-1], edges[1:], hist)
        },
    }


def transform_list(
    sources,
    fmap,
    schema,
    on_error,
    pii,
    detectors,
    threshold,
    near_dup,
    seed,
    fractions,
    has_test,
    split_unit: str = "row",
) -> list[dict]:
    """The exact, ordered list of transforms applied (recorded in the run config and dataset.json)."""
    bands, rows = lsh_params(threshold)
    return [
        {
            "op": "read",
            "files": [{"file": s.path.name, "format": s.fmt, "role": "test" if s.test else "data"} for s in sources],
            "encoding": "utf-8 (BOM skipped)",
        },
        {"op": "map", "mapping": fmap},
        {
            "op": "validate",
            "schema": schema,
            "on_error": on_error,
            "keep": list(SCHEMAS[schema]) + list(OPTIONAL_COLUMNS),
        },
        {"op": "normalize", "unicode": "NFC", "newlines": "LF", "strip": True},
        {"op": "pii", "mode": pii, "detectors": sorted({d.name for d in detectors})},
        {"op": "dedup_exact", "key": "blake2b-64 of the schema fields", "keep": "first"},
        {
            "op": "near_duplicates",
            "method": "minhash-lsh",
            "shingle": "char-5",
            "num_perm": 64,
            "bands": bands,
            "rows": rows,
            "threshold": threshold,
            "action": near_dup,
        },
        {
            "op": "split",
            "seed": seed,
            "fractions": list(fractions),
            "stratify": "label" if schema == "classification" else None,
            "unit": (
                "group, else near-duplicate cluster, else row"
                if split_unit == "group"
                else "near-duplicate cluster, else row"
            ),
            "test": "test_file" if has_test else "sampled",
        },
    ]
