"""``finetrace init``."""

from __future__ import annotations

import typer

from ..workspace import Workspace
from .common import JSON_OPTION, STATE, emit_json


def register(app: typer.Typer) -> None:
    @app.command("init")
    def init(path: str = typer.Argument(None, help="Folder to create (default: --workspace or ./.finetrace)."),
             witness: str = typer.Option(None, "--witness", help="File outside the workspace that keeps the latest "
                                         "checkpoint (default: ~/.local/state/finetrace/witness/)."),
             json_out: bool = JSON_OPTION):
        """Create a workspace: ledger.db (SQLite, WAL), objects/, and an Ed25519 signing key."""
        ws = Workspace.init(path or STATE.workspace, witness=witness)
        if json_out:
            emit_json({"workspace": str(ws.root), "key_id": ws.keys.key_id, "witness": str(ws.witness_path)})
        else:
            typer.echo(f"workspace {ws.root}\nsigning key {ws.keys.key_id}\nwitness {ws.witness_path}")
