"""Sending training runs to the trackers teams already watch: MLflow and TensorBoard (optional extras).

    tracking: {mlflow: ./mlruns, tensorboard: ./tb}     # in a train config: exported when the run ends
    finetrace export-runs --mlflow ./mlruns             # past runs, from the ledger

What a tracker gets is read back from the ledger and the adapter's own files, so a live run and a
later export give the same record: the resolved config as parameters (dotted keys), every logged step
of ``metrics.jsonl`` (loss, lr, grad_norm, validation loss) as per-step metrics, the run's final metrics,
the loss-curve PNG, and tags linking back (``finetrace.run_id``, ``finetrace.adapter_digest``). MLflow also
gets the dataset version as a dataset input whose ``digest`` is the dataset artifact's digest. An export
is idempotent: a run already in the MLflow experiment (same ``finetrace.run_id`` tag) or already in the
TensorBoard folder is skipped.

Install: ``pip install 'finetrace[tracking]'`` (mlflow-skinny, tensorboard).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from .errors import DependencyError, FinetraceError, InputError
from .workspace import Workspace

RUN_TAG = "finetrace.run_id"
PARAM_MAX = 6000  # MLflow's longest parameter value


class TrackingParams(BaseModel):
    """Where a training run is reported besides the ledger (not part of the run's identity)."""

    model_config = ConfigDict(extra="forbid")

    mlflow: str | None = Field(
        None,
        description="MLflow tracking URI (a folder or file: URI is a local file "
        "store; http(s):// a tracking server; sqlite:///... a database).",
    )
    tensorboard: str | None = Field(None, description="Folder for TensorBoard event files (one sub-folder per run).")
    experiment: str = Field("finetrace", description="MLflow experiment name.")


def step_history(ws: Workspace, run) -> list[dict]:
    """The per-step metrics (``metrics.jsonl``) of a run's output folder (a train run's adapter), or []."""
    for digest in run.outputs:
        try:
            entry = next((e for e in ws.store.tree(digest) if e.path == "metrics.jsonl"), None)
        except FinetraceError:
            continue
        if entry is not None:
            return [json.loads(line) for line in ws.store.read_bytes(entry.digest).decode().splitlines() if line]
    return []


def flatten(doc: dict, prefix: str = "") -> dict[str, str]:
    """``{"lora": {"r": 4}}`` -> ``{"lora.r": "4"}`` (lists and scalars as JSON text)."""
    out: dict[str, str] = {}
    for k, v in doc.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = (v if isinstance(v, str) else json.dumps(v))[:PARAM_MAX]
    return out


def _ms(iso: str | None) -> int | None:
    return int(datetime.fromisoformat(iso).timestamp() * 1000) if iso else None


def _facts(ws: Workspace, run) -> dict:
    """The adapter and dataset a train run links to (digests and names)."""
    out = {"adapter": None, "adapter_ref": None, "dataset": None, "dataset_ref": None, "loss_png": None}
    for d in run.outputs:
        a = ws.ledger.artifact(d)
        if a.kind in ("adapter", "model"):
            out["adapter"], out["adapter_ref"] = a.digest, a.ref
            png = next((e for e in ws.store.tree(d) if e.path == "loss_curve.png"), None)
            out["loss_png"] = png.digest if png else None
    for d in run.inputs:
        try:
            a = ws.ledger.artifact(d)
        except FinetraceError:
            continue
        if a.kind == "dataset":
            out["dataset"], out["dataset_ref"] = a.digest, a.ref
    return out


def _scalar_metrics(metrics: dict | None) -> dict[str, float]:
    return {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def mlflow_uri(uri: str) -> str:
    """A tracking URI; a plain folder becomes a ``file:`` URI (MLflow's local file store, opted into)."""
    if "://" not in uri and not uri.startswith("file:"):
        uri = Path(uri).expanduser().resolve().as_uri()
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the user asked for a file store by name
    return uri


def export_mlflow(ws: Workspace, run, uri: str, experiment: str = "finetrace") -> str:
    """Log one ledger run to MLflow; returns the MLflow run id (the existing one if already exported)."""
    try:
        from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise DependencyError("MLflow is not installed", hint="pip install 'finetrace[tracking]'") from None
    client = MlflowClient(tracking_uri=mlflow_uri(uri))
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_TAG}` = '{run.id}'", max_results=1)
    if found:
        return found[0].info.run_id
    facts = _facts(ws, run)
    tags = {
        RUN_TAG: run.id,
        "finetrace.kind": run.kind,
        "finetrace.status": run.status,
        "finetrace.workspace": str(ws.root),
        "mlflow.user": run.actor or "",
    }
    tags.update(
        {
            f"finetrace.{k}_digest" if k in ("adapter", "dataset") else f"finetrace.{k}": v
            for k, v in facts.items()
            if v and k != "loss_png"
        }
    )
    mr = client.create_run(exp_id, start_time=_ms(run.started), tags=tags, run_name=run.id)
    rid = mr.info.run_id
    params = [Param(k, v) for k, v in flatten(run.config).items()]
    if facts["adapter"]:
        params.append(Param("adapter_digest", facts["adapter"]))
    for i in range(0, len(params), 100):
        client.log_batch(rid, params=params[i : i + 100])
    now = _ms(run.ended) or _ms(run.started)
    hist = step_history(ws, run)
    metrics = [
        Metric(k, float(v), now, int(row["step"]))
        for row in hist
        for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    last = int(hist[-1]["step"]) if hist else 0
    metrics += [
        Metric(k, v, now, last) for k, v in _scalar_metrics(run.metrics).items() if not any(m.key == k for m in metrics)
    ]
    for i in range(0, len(metrics), 1000):
        client.log_batch(rid, metrics=metrics[i : i + 1000])
    if facts["dataset"]:
        ds = Dataset(
            name=facts["dataset_ref"],
            digest=facts["dataset"],
            source_type="finetrace",
            source=json.dumps({"workspace": str(ws.root), "digest": facts["dataset"], "ref": facts["dataset_ref"]}),
        )
        client.log_inputs(rid, [DatasetInput(ds, [InputTag("mlflow.data.context", "training")])])
    if facts["loss_png"]:
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / "loss_curve.png"
            png.write_bytes(ws.store.read_bytes(facts["loss_png"]))
            client.log_artifact(rid, str(png))
    status = {"succeeded": RunStatus.FINISHED, "failed": RunStatus.FAILED}.get(run.status, RunStatus.KILLED)
    client.set_terminated(rid, RunStatus.to_string(status), end_time=_ms(run.ended))
    return rid


def export_tensorboard(ws: Workspace, run, folder: str | Path) -> Path:
    """Write one ledger run's per-step metrics as TensorBoard events under ``folder/<run id>``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DependencyError("TensorBoard is not installed", hint="pip install 'finetrace[tracking]'") from None
    out = Path(folder).expanduser() / run.id
    if out.is_dir() and any(out.glob("events.out.tfevents.*")):
        return out
    facts = _facts(ws, run)
    start = (_ms(run.started) or 0) / 1000
    writer = SummaryWriter(log_dir=str(out))
    try:
        for row in step_history(ws, run):
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    group = "val" if k.startswith("val_") else "train"
                    writer.add_scalar(f"{group}/{k}", float(v), int(row["step"]), walltime=start)
        for k, v in _scalar_metrics(run.metrics).items():
            writer.add_scalar(f"final/{k}", v, 0, walltime=start)
        writer.add_text(
            "finetrace",
            f"ledger run `{run.id}`; adapter `{facts['adapter']}` ({facts['adapter_ref']});"
            f" dataset `{facts['dataset']}` ({facts['dataset_ref']})",
            0,
            walltime=start,
        )
        writer.add_text(
            "config", "```\n" + json.dumps(run.config, indent=2, sort_keys=True) + "\n```", 0, walltime=start
        )
    finally:
        writer.close()
    return out


def export_runs(
    ws: Workspace,
    run_ids: list[str] | None = None,
    mlflow: str | None = None,
    tensorboard: str | None = None,
    experiment: str = "finetrace",
) -> list[dict]:
    """Export ledger runs (default: every finished train run) to MLflow and/or TensorBoard.

    Returns ``[{"run", "mlflow_run_id", "tensorboard"}]``. Raises InputError without a destination,
    DependencyError when the extra is missing.
    """
    if not mlflow and not tensorboard:
        raise InputError("nothing to export to", hint="pass --mlflow URI and/or --tensorboard DIR")
    runs = (
        [ws.ledger.get_run(r) for r in run_ids]
        if run_ids
        else [r for r in ws.ledger.runs("train") if r.status != "running"]
    )
    out = []
    for run in runs:
        row = {"run": run.id, "mlflow_run_id": None, "tensorboard": None}
        if mlflow:
            row["mlflow_run_id"] = export_mlflow(ws, run, mlflow, experiment)
        if tensorboard:
            row["tensorboard"] = str(export_tensorboard(ws, run, tensorboard))
        out.append(row)
    return out


def track_run(ws: Workspace, run_id: str, params: TrackingParams) -> list[dict]:
    """Called by ``train`` when a run with ``tracking:`` ends; a failure is a warning (the adapter is
    already recorded), naming the command that retries the export."""
    try:
        return export_runs(ws, [run_id], params.mlflow, params.tensorboard, params.experiment)
    except Exception as exc:  # noqa: BLE001 - the run itself succeeded; say so and how to retry
        retry = " ".join(
            ["finetrace export-runs", run_id]
            + (["--mlflow", params.mlflow] if params.mlflow else [])
            + (["--tensorboard", params.tensorboard] if params.tensorboard else [])
        )
        print(
            f"warning: the run was recorded, but exporting it to the tracker failed: {exc}; retry with `{retry}`",
            file=sys.stderr,
        )
        return []
