"""SIGKILL chaos: `import` and `train` killed at seeded points across their write windows.

A counting run first numbers every write event of the command (file creations, renames, removals, ledger
appends: see chaos_child.py); then for each of 10 seeded points, one per tenth of that sequence, a fresh
copy of the workspace runs the command and is SIGKILLed at exactly that event. After each kill:

- the next start (``Workspace.open``) marks the dead run interrupted and deletes its scratch space;
- ``finetrace verify`` passes;
- nothing partial is visible: a recorded dataset or adapter is complete, every checkpoint loads;
- the command run again (train: ``--resume``) gives the same digest as the uninterrupted run.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finetrace.workspace import Workspace

SEED = 18
POINTS = 10
CHILD = Path(__file__).with_name("chaos_child.py")
TRAIN = {
    "base_model": "tiny",
    "dataset": "toy",
    "output_name": "chaos-lora",
    "batch_size": 4,
    "max_steps": 3,
    "lr": 5e-3,
    "checkpoint_every": 1,
    "compile": False,
    "seed": 0,
    "eval_max_examples": 4,
}
DEBRIS = (
    "cache/import-*",
    "cache/.train-*",
    "objects/tmp/*.part",
    "cache/trees/.build-*",
    "locks/*.lock",
    "locks/runs/*",
    "checkpoints/train/*/.build-*",
)

pytestmark = pytest.mark.slow


class Zygote:
    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def run(self, kind: str, root: Path, kill_at: int) -> tuple[int, dict]:
        count = root.parent / "count.json"
        self.proc.stdin.write(f"{kind} {root} {kill_at} {count}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the chaos zygote died"
        return int(line), json.loads(count.read_text())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_dir):
    """A workspace with the tiny model and a dataset, and a CSV to import (copied for each kill point)."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    from finetrace.models import add_folder

    tmp = tmp_path_factory.mktemp("chaos")
    ws = Workspace.init(tmp / "ws")
    add_folder(ws, tiny_model_dir, name="tiny")
    ds = tmp / "ds"
    ds.mkdir()
    splits = {"train": rows(24, 0), "validation": rows(4, 1)}
    for split, rs in splits.items():
        pq.write_table(pa.Table.from_pylist(rs), ds / f"{split}.parquet")
    (ds / "dataset.json").write_text(
        json.dumps(
            {
                "schema": "completion",
                "columns": ["prompt", "completion"],
                "labels": None,
                "counts": {s: len(r) for s, r in splits.items()},
            }
        )
    )
    ws.ledger.add_artifact("dataset", ws.store.put_dir(ds), name="toy")
    ws.close()
    with open(tmp / "rows.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["prompt", "completion"])
        w.writeheader()
        w.writerows(rows(40, 2))
    return tmp


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = ["fox", "dog", "contract", "invoice", "data", "model"]
    out = []
    for _ in range(n):
        picked = [rng.choice(words) for _ in range(rng.randint(1, 5))]
        out.append({"prompt": "Repeat: " + " ".join(picked), "completion": " ".join(picked[::-1])})
    return out


def fresh_copy(base: Path, dest: Path) -> Path:
    dest.mkdir()
    shutil.copytree(base / "ws", dest / "ws", symlinks=True)
    (dest / "chaos.json").write_text(json.dumps({"files": [str(base / "rows.csv")], "train": TRAIN}))
    return (dest / "ws").resolve()


def kill_points(total: int) -> list[int]:
    rng = random.Random(SEED)
    edges = [1 + total * i // POINTS for i in range(POINTS + 1)]
    return [rng.randint(lo, max(lo, hi - 1)) for lo, hi in zip(edges, edges[1:])]


def debris(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for pattern in DEBRIS for p in root.glob(pattern))


def check_after_kill(root: Path, kind: str) -> Workspace:
    """The next start reclaims; verify passes; no run is left running."""
    from finetrace.cli import main

    ws = Workspace.open(root)  # the next start
    assert debris(root) == [], debris(root)
    runs = ws.ledger.runs()
    assert [r.id for r in runs if r.status == "running"] == []
    killed = [r for r in runs if r.kind == kind and r.status != "succeeded"]
    assert all(r.status == "interrupted" and "died without finishing" in (r.error or "") for r in killed)
    assert main(["-w", str(root), "verify"]) == 0
    return ws


def scenario(zygote, base, tmp_path, kind: str, check):
    ref_root = fresh_copy(base, tmp_path / "uninterrupted")
    rc, count = zygote.run(kind, ref_root, 0)
    assert rc == 0 and not count["killed"], count
    ref = Workspace.open(ref_root)
    want = check(ref, None)
    ref.close()
    points = kill_points(count["events"])
    assert len(set(points)) == POINTS and points[-1] <= count["events"]
    seen = []
    for n in points:
        root = fresh_copy(base, tmp_path / f"kill-{n}")
        rc, got = zygote.run(kind, root, n)
        assert rc == -9 and got["killed"] and got["events"] == n, (n, got)
        seen.append(got["last"])
        ws = check_after_kill(root, kind)
        assert check(ws, want) == want, f"killed at event {n} ({got['last']})"
        ws.close()
    return seen


def test_sigkill_during_import_at_10_points(zygote, base, tmp_path):
    from finetrace.data import import_dataset

    def check(ws, want):
        sets = ws.ledger.artifacts("dataset")
        chaos = [a for a in sets if "chaos@1" in a.aliases]
        for a in chaos:  # visible means complete
            folder = ws.store.materialize(a.digest)
            assert (folder / "train.parquet").is_file() and (folder / "dataset.json").is_file()
        if want is None:
            return chaos[0].digest
        again = import_dataset(ws, [str(base / "rows.csv")], "chaos", schema="completion", splits=(0.8, 0.2, 0.0))
        return again.digest

    seen = scenario(zygote, base, tmp_path, "import", check)
    assert any("ledger.append run.started" in s for s in seen) or any("import-" in s for s in seen), seen


def test_sigkill_during_train_at_10_points(zygote, base, tmp_path):
    from finetrace.train import TrainConfig, train
    from finetrace.train.checkpoint import checkpoint_folder

    cfg = TrainConfig(**TRAIN)

    def check(ws, want):
        for a in ws.ledger.artifacts("adapter"):  # visible means complete
            names = {p.name for p in ws.store.materialize(a.digest).iterdir()}
            assert {"adapter_model.safetensors", "adapter_config.json", "finetrace_adapter.json"} <= names
        folder = checkpoint_folder(ws.root, None, cfg.output_name)
        for step in folder.glob("step-*"):
            assert (step / "COMPLETE").is_file(), step  # a step-* folder is whole or absent
        if want is None:
            return ws.ledger.resolve("chaos-lora").digest
        return train(ws, cfg, resume=True, progress=False).digest  # resumes, starts fresh, or recognises

    seen = scenario(zygote, base, tmp_path, "train", check)
    assert any("step-" in s or "checkpoints" in s for s in seen), seen
