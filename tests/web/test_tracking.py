"""Runs in the trackers: what MLflow (a local file store, read back with ``mlflow.search_runs``) and
TensorBoard (event files, read back with TensorBoard's event reader) hold equals the ledger."""

from __future__ import annotations

import json
from importlib.util import find_spec

import pytest

# checked, not imported, at collection (importing mlflow takes seconds in every test worker)
pytestmark = pytest.mark.skipif(
    find_spec("mlflow") is None or find_spec("tensorboard") is None,
    reason="the tracking extra is not installed (pip install 'finetrace[tracking]')",
)


@pytest.fixture(scope="module")
def ws(console_env):
    from finetrace.workspace import Workspace

    w = Workspace.open(console_env["root"])
    yield w
    w.close()


def _search(uri: str, experiment: str):
    import mlflow

    from finetrace.tracking import mlflow_uri

    mlflow.set_tracking_uri(mlflow_uri(uri))
    return mlflow.search_runs(experiment_names=[experiment], output_format="pandas")


def _check_mlflow_run(row, client, ws, run):
    from finetrace.tracking import flatten, step_history

    adapter = ws.ledger.artifact(run.outputs[0])
    dataset = next(ws.ledger.artifact(d) for d in run.inputs if ws.ledger.artifact(d).kind == "dataset")
    assert row["tags.finetrace.run_id"] == run.id and row["status"] == "FINISHED"
    assert row["tags.finetrace.adapter_digest"] == adapter.digest == row["params.adapter_digest"]
    params = flatten(run.config)
    for key in ("lr", "max_steps", "batch_size", "lora.r", "lora.alpha", "seed", "resolved.dataset"):
        assert row[f"params.{key}"] == params[key], key
    assert float(row["params.lr"]) == run.config["lr"] and int(row["params.lora.r"]) == run.config["lora"]["r"]
    for key in ("final_loss", "tokens", "steps", "wall_time_s"):
        assert row[f"metrics.{key}"] == pytest.approx(run.metrics[key]), key
    hist = [h for h in step_history(ws, run) if "loss" in h]
    curve = client.get_metric_history(row["run_id"], "loss")
    assert [(m.step, m.value) for m in sorted(curve, key=lambda m: m.step)] == [(h["step"], h["loss"]) for h in hist]
    inputs = client.get_run(row["run_id"]).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [(dataset.ref, dataset.digest)]
    assert json.loads(inputs[0].dataset.source)["digest"] == dataset.digest
    arts = [a.path for a in client.list_artifacts(row["run_id"])]
    assert arts == ["loss_curve.png"]


def test_train_config_tracking_reports_the_run_to_mlflow(console_env, ws):
    """The pipeline's train stage had ``tracking: {mlflow: ...}``: its run is in the store, equal to the ledger."""
    from mlflow.tracking import MlflowClient

    from finetrace.tracking import mlflow_uri

    df = _search(str(console_env["tmp"] / "mlruns"), "console-test")
    assert len(df) == 1  # the second adapter was trained without tracking
    run = ws.ledger.get_run(console_env["train_run"])
    client = MlflowClient(tracking_uri=mlflow_uri(str(console_env["tmp"] / "mlruns")))
    _check_mlflow_run(df.iloc[0], client, ws, run)


def test_train_config_tracking_writes_tensorboard_events(console_env, ws):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from finetrace.tracking import step_history

    run = ws.ledger.get_run(console_env["train_run"])
    acc = EventAccumulator(str(console_env["tmp"] / "tb" / run.id))
    acc.Reload()
    hist = [h for h in step_history(ws, run) if "loss" in h]
    got = [(s.step, s.value) for s in acc.Scalars("train/loss")]
    assert [s for s, _ in got] == [h["step"] for h in hist]
    assert [v for _, v in got] == pytest.approx([h["loss"] for h in hist], rel=1e-6)  # stored as float32
    assert acc.Scalars("final/final_loss")[0].value == pytest.approx(run.metrics["final_loss"], rel=1e-6)
    assert {"train/lr", "train/grad_norm"} <= set(acc.Tags()["scalars"])


def test_export_runs_sends_past_runs_once(console_env, ws, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from finetrace.cli import main
    from finetrace.tracking import mlflow_uri

    store, tb = tmp_path / "mlruns", tmp_path / "tb"
    args = [
        "--workspace",
        str(console_env["root"]),
        "export-runs",
        "--mlflow",
        str(store),
        "--tensorboard",
        str(tb),
        "--experiment",
        "past",
        "--json",
    ]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    trains = ws.ledger.runs("train")
    assert [r["run"] for r in first] == [r.id for r in trains] and len(trains) == 2
    assert main(args) == 0  # again: nothing duplicated
    assert json.loads(capsys.readouterr().out) == first
    df = _search(str(store), "past")
    assert sorted(df["tags.finetrace.run_id"]) == sorted(r.id for r in trains)
    client = MlflowClient(tracking_uri=mlflow_uri(str(store)))
    for run in trains:
        _check_mlflow_run(df[df["tags.finetrace.run_id"] == run.id].iloc[0], client, ws, run)
    assert sorted(p.name for p in tb.iterdir()) == sorted(r.id for r in trains)
    assert main(["--workspace", str(console_env["root"]), "export-runs"]) != 0
    assert "nothing to export to" in capsys.readouterr().err
