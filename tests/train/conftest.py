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
    meta = {
        "schema": schema,
        "columns": list(splits["train"][0]),
        "labels": labels,
        "counts": {s: len(r) for s, r in splits.items()},
    }
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
        rows.append({"prompt": "Repeat: " + " ".join(picked), "completion": " ".join(picked[::-1]), "id": str(i)})
    return rows


ROUTES = {"billing": "invoice", "technical": "model", "account": "user", "shipping": "goods"}


def routing_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable classification task: the label follows from one keyword in the text."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(ROUTES))
        filler = " ".join(rng.choice(["the", "a", "data", "fox", "dog"]) for _ in range(rng.randint(1, 5)))
        rows.append({"text": f"{filler} {ROUTES[label]} {filler}", "label": label})
    return rows


@pytest.fixture(scope="session")
def learnable_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with embeddings scaled up (std 0.02 -> 0.1).

    With tied embeddings of std 0.02 and a frozen final norm, the largest logit a LoRA-only update can
    reach is about |h| |e| = 8 x 0.16, so the loss of any task is stuck near ln(V) - 1.3; a real model's
    embeddings are far larger. Scaling them makes the toy task learnable by LoRA as by a real model.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("learnable-model")
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, out / f.name)
    weights = load_file(out / "model.safetensors")
    key = next(k for k in weights if k.endswith("embed_tokens.weight"))
    weights[key] = (weights[key] * 5).contiguous()
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture
def tiny_setup(workspace, learnable_model_dir, tmp_path):
    """(workspace, base ref, dataset ref): a tiny model, a toy completion set and a routing (classification) set."""
    return fill_workspace(workspace, learnable_model_dir, tmp_path)


def fill_workspace(workspace, learnable_model_dir, tmp_path):
    """What ``tiny_setup`` records: the model as ``tiny``, the datasets ``toy`` and ``routing``."""
    from finetrace.models import add_folder

    add_folder(workspace, learnable_model_dir, name="tiny")
    folder = write_dataset(tmp_path / "ds", {"train": toy_rows(48), "validation": toy_rows(8, seed=1)})
    workspace.ledger.add_artifact("dataset", workspace.store.put_dir(folder), name="toy")
    folder = write_dataset(
        tmp_path / "cls",
        {"train": routing_rows(56), "validation": routing_rows(8, seed=1)},
        schema="classification",
        labels=sorted(ROUTES),
    )
    workspace.ledger.add_artifact("dataset", workspace.store.put_dir(folder), name="routing")
    return workspace, "tiny", "toy"


@pytest.fixture(scope="session")
def zygote():
    """A process with the training stack imported that forks the ``finetrace`` commands the kill tests kill."""
    from .train_support import Zygote

    z = Zygote()
    yield z
    z.close()


from .train_support import make_config  # noqa: E402,F401
