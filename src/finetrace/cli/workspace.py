"""``finetrace init`` and ``finetrace gc``."""

from __future__ import annotations

import typer

from ..workspace import Workspace
from .common import JSON_OPTION, STATE, emit_json


def register(app: typer.Typer) -> None:
    @app.command("init")
    def init(
        path: str = typer.Argument(None, help="Folder to create (default: --workspace or ./.finetrace)."),
        witness: str = typer.Option(
            None,
            "--witness",
            help="File outside the workspace that keeps the latest "
            "checkpoint (default: ~/.local/state/finetrace/witness/).",
        ),
        json_out: bool = JSON_OPTION,
    ):
        """Create a workspace: ledger.db (SQLite, WAL), objects/, and an Ed25519 signing key."""
        ws = Workspace.init(path or STATE.workspace, witness=witness)
        if json_out:
            emit_json({"workspace": str(ws.root), "key_id": ws.keys.key_id, "witness": str(ws.witness_path)})
        else:
            typer.echo(f"workspace {ws.root}\nsigning key {ws.keys.key_id}\nwitness {ws.witness_path}")

    @app.command("gc")
    def gc(
        dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be done; change nothing."),
        json_out: bool = JSON_OPTION,
    ):
        """Reclaim crash debris: mark runs of dead processes interrupted, delete their scratch files.

        Safe while other commands run: what a live process owns is kept. Also deletes scratch entries
        written before lock files existed (those the automatic clean-up on start leaves alone).
        """
        from ..debris import reclaim

        ws = Workspace.open(STATE.workspace, reclaim=False)
        rep = reclaim(ws, unowned=True, dry_run=dry_run)
        if json_out:
            emit_json(rep.to_dict())
            return
        verb = "would " if dry_run else ""
        typer.echo(f"{verb}mark interrupted: {len(rep.interrupted)} run(s) {' '.join(rep.interrupted)}".rstrip())
        typer.echo(
            f"{verb}delete: {len(rep.removed)} scratch entr{'y' if len(rep.removed) == 1 else 'ies'}, "
            f"{rep.bytes_freed:,} bytes"
        )
        if rep.running or rep.kept:
            typer.echo(f"kept: {len(rep.running)} running run(s), {len(rep.kept)} scratch entries of live processes")
        for run_id in rep.unowned:
            typer.echo(
                f"left: run {run_id} is 'running' with no lock file (started by an older finetrace, or "
                f"on another machine); it is not marked"
            )
