"""``finetrace train CONFIG.yaml [--set key=value ...] [--resume] [--print-config] [--plan]``."""

from __future__ import annotations

import warnings

import typer

from ..errors import FinetraceError
from .common import JSON_OPTION, emit_json, open_workspace


class Interrupted(FinetraceError):
    """Training stopped by SIGTERM/SIGINT after writing a checkpoint (exit 130, like a shell)."""

    exit_code = 130


def register(app: typer.Typer) -> None:
    # duplicates: alike cli/serve.py:serve_cmd on purpose (typer option declarations).
    @app.command("train")
    def train_cmd(
        config: str = typer.Argument(None, help="YAML training config (see --print-config)."),
        set_: list[str] = typer.Option([], "--set", help="Override a key: --set lr=1e-4 --set lora.r=8."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint."),
        print_config: bool = typer.Option(
            False,
            "--print-config",
            help="Print the resolved config (or, without CONFIG, every key with its default and description) and exit.",
        ),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
        plan: bool = typer.Option(
            False,
            "--plan",
            help="Print the memory plan (peak memory estimated from the "
            "model's headers and the data, against what the device has) and exit; "
            "nothing is loaded or recorded.",
        ),
        json_out: bool = JSON_OPTION,
    ):
        """Fine-tune a base model on a dataset (LoRA, rsLoRA, DoRA or full) and record the adapter."""
        from ..train import describe, load_config, memory_plan, train
        from ..train.config import config_yaml
        from ..train.resume import ResumeWarning, made_by
        from .progress import Bars

        if print_config:
            typer.echo(config_yaml(load_config(config, set_)) if config or set_ else describe(), nl=False)
            return
        if config is None and not set_:
            raise typer.BadParameter("give a CONFIG.yaml (or --print-config to see every key)")
        cfg = load_config(config, set_)
        ws = open_workspace()
        if plan:
            p = memory_plan(ws, cfg)
            if json_out:
                emit_json(p.to_json())
            else:
                typer.echo(p.render(), nl=False)
            return
        try:
            with warnings.catch_warnings(record=True) as notes:
                warnings.simplefilter("always", ResumeWarning)
                with Bars(not no_progress and not json_out) as bars:
                    art = train(ws, cfg, resume=resume, progress=bars)
        except KeyboardInterrupt as exc:  # typer would turn it into a silent exit
            raise Interrupted(str(exc) or "training interrupted", hint="continue with --resume") from None
        finally:
            for note in notes:
                if issubclass(note.category, ResumeWarning):
                    typer.echo(f"note: {note.message}", err=True)
                else:
                    warnings.showwarning(note.message, note.category, note.filename, note.lineno)
        run = ws.ledger.get_run(made_by(ws, art))  # this run, not the first that made these bytes
        if json_out:
            emit_json({"artifact": art.to_dict(), "run": run.id, "metrics": run.metrics})
            return
        m = run.metrics or {}
        typer.echo(f"{art.kind} {art.ref} {art.digest}")
        if m.get("final_loss") is None:  # a run killed after it recorded the adapter has no metrics
            typer.echo(f"run {run.id} ({run.status})")
            return
        typer.echo(
            f"run {run.id}: {m.get('steps')} steps, final loss {m.get('final_loss'):.4f}"
            + (f", val loss {m['val_loss']:.4f}" if m.get("val_loss") is not None else "")
            + f", {m.get('tokens_per_s')} tokens/s, {m.get('wall_time_s')} s"
        )
