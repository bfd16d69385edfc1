"""Fixtures for the evaluate tests: a tiny model with varied outputs, dataset and adapter builders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def varied_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with larger random weights, so greedy answers differ from prompt to prompt
    (the stock tiny model answers every prompt with newlines)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("varied-model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def add_dataset(
    ws,
    rows: list[dict],
    schema: str,
    labels: list[str] | None = None,
    split: str = "test",
    name: str = "evalset",
    tmp: Path | None = None,
):
    """Write a dataset artifact folder (dataset.json + SPLIT.parquet) and record it."""
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(tempfile.mkdtemp(dir=tmp))
    meta = {"schema": schema, "columns": sorted(rows[0]), "counts": {split: len(rows)}}
    if labels:
        meta["labels"] = labels
    (folder / "dataset.json").write_text(json.dumps(meta))
    pq.write_table(pa.Table.from_pylist(rows), folder / f"{split}.parquet")
    return ws.ledger.add_artifact("dataset", ws.store.put_dir(folder), name=name)


def add_adapter(ws, model_dir, base_digest: str, name: str, noop: bool = False, seed: int = 0):
    """A LoRA adapter on the tiny model, recorded as an ``adapter`` artifact. ``noop``: B = 0."""
    import tempfile

    from finetrace.models.tiny import random_lora

    folder = random_lora(
        model_dir,
        tempfile.mkdtemp(),
        seed,
        target_modules=("q_proj", "v_proj", "o_proj"),
        b_std=0.0 if noop else 0.5,
        init_lora_weights=noop,
    )
    return ws.ledger.add_artifact("adapter", ws.store.put_dir(folder), name=name, metadata={"base_model": base_digest})


@pytest.fixture
def make_dataset(tmp_path):
    """``make_dataset(ws, rows, schema, labels=None, split="test", name="evalset") -> Artifact``."""
    return lambda ws, rows, schema, labels=None, split="test", name="evalset": add_dataset(
        ws, rows, schema, labels, split, name, tmp_path
    )


@pytest.fixture
def make_adapter():
    """``make_adapter(ws, model_dir, base_digest, name, noop=False, seed=0) -> Artifact``."""
    return add_adapter
