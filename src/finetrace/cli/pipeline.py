"""``finetrace run PIPELINE.yaml``: every stage from raw data to a served model, cached by digest."""

from __future__ import annotations

import typer

from ..errors import FinetraceError
from .common import JSON_OPTION, emit_json, open_workspace


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        pipeline: str = typer.Argument(..., help="Pipeline YAML file (see examples/*/pipeline.yaml)."),
        force: list[str] = typer.Option(
            [], "--force", help="Run this stage even if cached (repeatable; 'all' for every stage)."
        ),
        until: str = typer.Option(
            None, "--until", help="Stop after this stage (model, data, train, evaluate, docs, approve, deploy)."
        ),
        json_out: bool = JSON_OPTION,
    ):
        """Run a pipeline: model, data, train, evaluate (gates), docs, approve, deploy; print a summary.

        With --json, the result is JSON on stdout; progress and the summary table go to stderr.
        """
        from ..pipeline import run_pipeline
        from ..pipeline.summary import render
        from .progress import Bars

        ws = open_workspace()
        echo = (lambda s: typer.echo(s, err=True)) if json_out else typer.echo
        try:
            with Bars() as bars:  # on stderr: with --json too, stdout holds only the JSON
                result = run_pipeline(ws, pipeline, force=force, until=until, progress=bars, echo=echo)
        except (FinetraceError, KeyboardInterrupt) as exc:
            partial = getattr(exc, "pipeline_result", None)
            if partial is not None:
                if json_out:
                    emit_json(partial.to_dict())
                typer.echo("\n".join(render(partial)[:-2]), err=json_out)  # the edge prints the error
            raise
        typer.echo("\n".join(render(result)), err=json_out)
        if json_out:
            emit_json(result.to_dict())
