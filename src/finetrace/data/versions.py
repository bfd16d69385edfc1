"""Reading recorded dataset versions: list, open, head, stats, diff, and examples for train/evaluate.

Every read materialises the artifact through the store, so each file is re-hashed before use.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..canonical import canonical_json
from ..errors import InputError
from ..ledger import Artifact
from ..workspace import Workspace
from .schemas import SPLITS, Example, to_example


def open_dataset(ws: Workspace, ref: str) -> tuple[Path, dict, Artifact]:
    """(verified folder, dataset.json, artifact) of dataset ``ref`` (name, name@N or digest)."""
    art = ws.ledger.resolve(ref, kind="dataset")
    folder = ws.store.materialize(art.digest)
    info = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    return folder, info, art


def list_datasets(ws: Workspace) -> list[dict]:
    out = []
    for art in ws.ledger.artifacts("dataset"):
        for alias in art.aliases or [art.digest]:
            out.append(
                {
                    "ref": alias,
                    "digest": art.digest,
                    "schema": art.metadata.get("schema"),
                    "counts": art.metadata.get("counts"),
                    "rows_in": art.metadata.get("rows_in"),
                    "gaps": len(art.metadata.get("gaps") or []),
                    "created": art.created,
                    "run_id": art.run_id,
                }
            )
    return out


def _check_split(info: dict, split: str) -> None:
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}", hint=f"one of {', '.join(SPLITS)}")


def read_split(ws: Workspace, ref: str, split: str = "train"):
    """The split as a pyarrow Table (empty, with the right columns, when the split has no rows)."""
    import pyarrow.parquet as pq

    folder, info, _ = open_dataset(ws, ref)
    _check_split(info, split)
    f = folder / f"{split}.parquet"
    if not f.exists():
        from .batches import arrow_schema

        return arrow_schema(info["schema"], bool(info.get("tools"))).empty_table().select(info["columns"])
    return pq.read_table(f)


def iter_examples(ws: Workspace, ref: str, split: str = "train") -> Iterator[Example]:
    """Rows of a split rendered by ``to_example`` (the same rendering train and evaluate use)."""
    import pyarrow.parquet as pq

    folder, info, _ = open_dataset(ws, ref)
    _check_split(info, split)
    f = folder / f"{split}.parquet"
    if not f.exists():
        return
    for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield to_example(row, info["schema"], info.get("labels"), info.get("prompt_format"))


def head(ws: Workspace, ref: str, split: str = "train", n: int = 5) -> list[dict]:
    import pyarrow.parquet as pq

    folder, info, _ = open_dataset(ws, ref)
    _check_split(info, split)
    f = folder / f"{split}.parquet"
    if not f.exists():
        return []
    rows: list[dict] = []
    for batch in pq.ParquetFile(f).iter_batches(batch_size=max(1, n)):
        rows.extend(batch.to_pylist())
        if len(rows) >= n:
            break
    return rows[:n]


def stats(ws: Workspace, ref: str) -> dict:
    folder, info, art = open_dataset(ws, ref)
    sheet = json.loads((folder / "datasheet.json").read_text(encoding="utf-8"))
    keys = (
        "schema",
        "counts",
        "labels",
        "label_counts",
        "rows_in",
        "rows_valid",
        "rows_out",
        "skipped",
        "dropped",
        "duplicates",
        "pii",
        "normalized_rows",
        "dropped_columns",
        "seed",
        "fractions",
        "sources",
    )
    out = {"ref": art.ref, "digest": art.digest, **{k: info.get(k) for k in keys}}
    out["token_lengths"] = sheet.get("measured", {}).get("token_lengths")
    out["gaps"] = sheet.get("gaps", [])
    return out


def datasheet(ws: Workspace, ref: str) -> tuple[dict, Artifact]:
    folder, _, art = open_dataset(ws, ref)
    return json.loads((folder / "datasheet.json").read_text(encoding="utf-8")), art


def _row_keys(folder: Path, split: str, columns: list[str]) -> np.ndarray:
    import hashlib

    import pyarrow.parquet as pq

    f = folder / f"{split}.parquet"
    if not f.exists():
        return np.zeros(0, np.uint64)
    keys = []
    for batch in pq.ParquetFile(f).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            content = canonical_json([row.get(c) for c in columns])
            keys.append(int.from_bytes(hashlib.blake2b(content, digest_size=8).digest(), "little"))
    return np.asarray(keys, np.uint64)


def diff(ws: Workspace, ref_a: str, ref_b: str) -> dict:
    """What changed from ``ref_a`` to ``ref_b``: counts per split, rows added/removed, labels, sources."""
    fa, ia, aa = open_dataset(ws, ref_a)
    fb, ib, ab = open_dataset(ws, ref_b)
    out: dict = {
        "from": aa.ref,
        "to": ab.ref,
        "same": aa.digest == ab.digest,
        "schema": [ia["schema"], ib["schema"]] if ia["schema"] != ib["schema"] else ia["schema"],
        "splits": {},
    }
    columns = [c for c in ia["columns"] if c in ib["columns"] and c not in ("id", "group")]
    all_a, all_b = [], []
    for split in SPLITS:
        ka, kb = _row_keys(fa, split, columns), _row_keys(fb, split, columns)
        all_a.append(ka)
        all_b.append(kb)
        out["splits"][split] = {
            "from": int(len(ka)),
            "to": int(len(kb)),
            "added": int(len(np.setdiff1d(kb, ka))),
            "removed": int(len(np.setdiff1d(ka, kb))),
        }
    ta, tb = np.concatenate(all_a), np.concatenate(all_b)
    out["rows"] = {
        "from": int(len(ta)),
        "to": int(len(tb)),
        "added": int(len(np.setdiff1d(tb, ta))),
        "removed": int(len(np.setdiff1d(ta, tb))),
        "common": int(len(np.intersect1d(ta, tb))),
    }
    if ia.get("labels") or ib.get("labels"):
        la, lb = set(ia.get("labels") or []), set(ib.get("labels") or [])
        out["labels"] = {"added": sorted(lb - la), "removed": sorted(la - lb)}
    sa = {s["digest"]: s["file"] for s in ia.get("sources", [])}
    sb = {s["digest"]: s["file"] for s in ib.get("sources", [])}
    out["sources"] = {"added": [sb[d] for d in sb if d not in sa], "removed": [sa[d] for d in sa if d not in sb]}
    return out
