"""``finetrace export-runs [RUN ...] --mlflow URI --tensorboard DIR``: past runs into the trackers."""

from __future__ import annotations

import typer

from .common import JSON_OPTION, emit_json, open_workspace


def register(app: typer.Typer) -> None:
    @app.command("export-runs")
    def export_runs_cmd(
        runs: list[str] = typer.Argument(None, help="Run ids (default: every finished train run)."),
        mlflow: str = typer.Option(None, "--mlflow", help="MLflow tracking URI (a folder is a local file store)."),
        tensorboard: str = typer.Option(None, "--tensorboard", help="Folder for TensorBoard event files."),
        experiment: str = typer.Option("finetrace", "--experiment", help="MLflow experiment name."),
        json_out: bool = JSON_OPTION,
    ):
        """Export recorded runs to MLflow and/or TensorBoard: params, per-step metrics, loss curve, digests."""
        from ..tracking import export_runs

        rows = export_runs(open_workspace(), runs or None, mlflow, tensorboard, experiment)
        if json_out:
            emit_json(rows)
            return
        for r in rows:
            dest = [
                f"mlflow run {r['mlflow_run_id']}" if r["mlflow_run_id"] else "",
                f"tensorboard {r['tensorboard']}" if r["tensorboard"] else "",
            ]
            typer.echo(f"{r['run']} -> " + ", ".join(d for d in dest if d))
        if not rows:
            typer.echo("no finished train runs to export")
