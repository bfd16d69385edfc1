"""``finetrace new TASK --data FILE [--test FILE]``: a thin face over ``finetrace.data.newtask``."""

from __future__ import annotations

import typer

from .common import JSON_OPTION, emit_json


def register(app: typer.Typer) -> None:
    @app.command("new")
    def new(
        task: str = typer.Argument(..., help="Folder to create (its name is the task's name)."),
        data: str = typer.Option(
            ...,
            "--data",
            help="The data file (CSV, JSONL, JSON, Parquet; OpenAI, ShareGPT, Alpaca or finetrace columns).",
        ),
        test: str = typer.Option(None, "--test", help="A held-out test file (else 10% of the data is held out)."),
        model: str = typer.Option(
            "smollm2-135m-instruct", "--model", help="Base model: catalog name, HF folder or .gguf file."
        ),
        max_steps: int = typer.Option(None, "--max-steps", help="Cap the planned steps (a quick trial run)."),
        eval_limit: int = typer.Option(None, "--eval-limit", help="Evaluate only the first N test examples."),
        json_out: bool = JSON_OPTION,
    ):
        """Write a task folder (pipeline, train config, suite, datasheet and intended-use skeletons)."""
        from ..data.newtask import new_task

        plan = new_task(task, data, test, model=model, max_steps=max_steps, eval_limit=eval_limit)
        if json_out:
            emit_json(plan)
            return
        typer.echo(
            f"{plan['folder']}/: {plan['files']['data']} is a {plan['format']} file, {plan['layout']} layout, "
            f"{plan['schema']} schema, {plan['rows']} rows"
            + (f" (+{plan['test_rows']} test rows)" if plan["test_rows"] else "")
        )
        typer.echo(
            f"train: {plan['steps']} steps of {plan['batch_size']} (~{plan['epochs']} epochs), expected "
            f"~{plan['expected_train_minutes_cpu']} min on 2 CPU cores, peak ~{plan['peak_memory_gb_cpu']} GB"
        )
        if not plan["group_gap_gate"]:
            typer.echo("gates: no group-gap gate (the data has no group column)")
        typer.echo("fill in datasheet.yaml and intended_use.yaml (commented-out lines are reported as gaps), then:")
        typer.echo(f"  finetrace run {plan['folder']}/pipeline.yaml")
