"""Fixtures for training tests: a tiny base model and small datasets recorded in a workspace."""

from __future__ import annotations

import json
import random

import pytest


def write_dataset(folder, splits: dict[str, list[dict]], schema: str = "completion", labels=None):
    """A dataset artifact folder in the layout of ``finetrace.data.schemas``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{split}.parquet")
    meta = {"schema": schema, "columns": list(splits["train"][0]), "labels": labels,
            "counts": {s: len(r) for s, r in splits.items()}}
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


def toy_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable task: the answer is a fixed function of the prompt, with variable lengths."""
    rng = random.Random(seed)
    words = ["fox", "dog", "contract", "invoice", "data", "model", "train", "serve"]
    rows = []
    for i in range(n):
        k = rng.randint(1, 6)
        picked = [rng.choice(words) for _ in range(k)]
        rows.append({"prompt": "Repeat: " + " ".join(picked), "completion": " ".join(picked[::-1]),
                     "id": str(i)})
    return rows


@pytest.fixture
def tiny_setup(workspace, tiny_model_dir, tmp_path):
    """(workspace, base ref, dataset ref) with a tiny model and a 48-row toy dataset."""
    from finetrace.models import add_folder

    add_folder(workspace, tiny_model_dir, name="tiny")
    folder = write_dataset(tmp_path / "ds", {"train": toy_rows(48), "validation": toy_rows(8, seed=1)})
    workspace.ledger.add_artifact("dataset", workspace.store.put_dir(folder), name="toy")
    return workspace, "tiny", "toy"


def make_config(**kw):
    from finetrace.train import TrainConfig

    base = dict(base_model="tiny", dataset="toy", output_name="toy-lora", batch_size=4, max_steps=6,
                lr=5e-3, checkpoint_every=None, seed=0)
    base.update(kw)
    return TrainConfig(**base)
