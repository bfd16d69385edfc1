"""Helpers for the data-stage tests: small files, reading a dataset back, workspace snapshots."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def completion_rows(n: int = 30) -> list[dict]:
    return [
        {"prompt": f"Question number {i}: what is {i} times three?", "completion": f"The answer is {3 * i}."}
        for i in range(n)
    ]


def all_rows(ws, ref: str) -> list[dict]:
    from finetrace.data import read_split

    out = []
    for split in ("train", "validation", "test"):
        out.extend(read_split(ws, ref, split).to_pylist())
    return out


def snapshot(ws) -> tuple:
    """Everything a refused import must leave unchanged: ledger size, objects, artifacts."""
    return ws.ledger.size(), sorted(ws.store), [a.digest for a in ws.ledger.artifacts()]
