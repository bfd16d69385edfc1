"""One workspace for every console and tracker test: the pipeline test's own pipeline, run once per session.

``console_env`` runs ``tests/pipeline/test_pipeline.py``'s ``make_pipeline`` on the tiny model (import,
train with ``tracking:`` set to a local MLflow file store and a TensorBoard folder, evaluate, docs,
approve, serve one answer), with a ``<script>`` in a datasheet field. Then, through the public entry
points, a second adapter that fails a strict gate, and a failed re-evaluation of the first adapter that
a named person overrides, so every section of "needs a person" has something in it.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import yaml

from ..conftest import built_once

PIPELINE_TEST = Path(__file__).resolve().parents[1] / "pipeline" / "test_pipeline.py"
SCRIPT = "<script>alert('pwned')</script>"


def _pipeline_helpers():
    spec = importlib.util.spec_from_file_location("_finetrace_pipeline_test", PIPELINE_TEST)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build(tmp: Path, tiny_model_dir: Path) -> dict:
    """Run the pipeline and the extra runs in ``tmp``; the digests and ids the tests look up (JSON)."""
    from finetrace.evaluate import Suite, evaluate
    from finetrace.ledger.clearance import record_override
    from finetrace.pipeline import run_pipeline
    from finetrace.train import TrainConfig, train
    from finetrace.workspace import Workspace

    path = _pipeline_helpers().make_pipeline(tmp, tiny_model_dir)
    (tmp / "datasheet.yaml").write_text(
        yaml.safe_dump(
            {
                "title": "Routing tickets",
                "source": "synthetic",
                "license": "CC0-1.0",
                "collection_method": f"exported by hand {SCRIPT} then checked",
            }
        )
    )
    doc = yaml.safe_load(path.read_text())
    doc["train"]["tracking"] = {
        "mlflow": str(tmp / "mlruns"),
        "tensorboard": str(tmp / "tb"),
        "experiment": "console-test",
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    ws = Workspace.init(tmp / "ws")
    res = run_pipeline(ws, path, progress=False, echo=lambda s: None)
    adapter = ws.ledger.artifact(res.state["adapter"])
    dataset = ws.ledger.artifact(res.state["dataset"])
    strict = Suite.model_validate(
        {
            "name": "strict",
            "split": "test",
            "metrics": ["accuracy"],
            "scoring": "constrained",
            "bootstrap": {"samples": 20, "seed": 0},
            "forgetting": {"enabled": False},
            "bias": {"enabled": False},
            "gates": {"min_metric": {"accuracy": 1.0}, "min_gain": {"accuracy": 1.0}},
        }
    )
    other = train(
        ws,
        TrainConfig(
            base_model="tiny",
            dataset=dataset.ref,
            output_name="strict-lora",
            batch_size=4,
            max_steps=1,
            lr=5e-3,
            checkpoint_every=None,
            seed=1,
            threads=1,
            compile=False,
            lora={"r": 4, "alpha": 8, "target_modules": ["q_proj"]},
        ),
        progress=False,
    )
    evaluate(ws, "tiny", f"{dataset.ref}:test", adapter_ref=other.ref, suite=strict, name="strict-eval")
    evaluate(ws, "tiny", f"{dataset.ref}:test", adapter_ref=adapter.ref, suite=strict, name="strict-eval")
    record_override(ws.ledger, adapter.digest, "Grace Hopper", "accuracy 1.01 cannot be met; reviewed by hand")
    ws.checkpoint()
    info = {
        "adapter": adapter.digest,
        "dataset": dataset.digest,
        "strict": other.digest,
        "provenance_id": res.state["deploy"]["provenance_id"],
        "train_run": adapter.run_id,
    }
    ws.close()
    return info


@pytest.fixture(scope="package")
def console_env(tiny_model_dir, tmp_path_factory):
    """{"root", "tmp", "adapter", "dataset", "strict", "provenance_id", "train_run"}: this worker's copy.

    The pipeline runs once per test session (under pytest-xdist, the first worker to need it builds it in
    the session's shared temporary folder, under a lock, as ``audit_golden`` does); each worker copies the
    whole folder (workspace, MLflow store, TensorBoard events), so no worker sees another's writes.
    """
    from finetrace.workspace import Workspace

    built, info = built_once(tmp_path_factory, "console-env", lambda root: _build(root, tiny_model_dir))
    tmp = tmp_path_factory.mktemp("console")
    shutil.copytree(built, tmp, symlinks=True, dirs_exist_ok=True)
    with Workspace.open(tmp / "ws") as ws:
        arts = {k: ws.ledger.artifact(info[k]) for k in ("adapter", "dataset", "strict")}
    return {**info, **arts, "root": (tmp / "ws").resolve(), "tmp": tmp}
