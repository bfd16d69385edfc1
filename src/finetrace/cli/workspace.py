"""``finetrace init``."""

from __future__ import annotations

import typer

from ..workspace import Workspace
from .common import JSON_OPTION, STATE, emit_json


def register(app: typer.Typer) -> None:
    @app.command("init")
    def init(path: str = typer.Argument(None, help="Folder to create (default: --workspace or ./.finetrace)."),
             json_out: bool = JSON_OPTION):
        """Create a workspace: ledger.db (SQLite, WAL), objects/, and an Ed25519 signing key."""
        ws = Workspace.init(path or STATE.workspace)
        if json_out:
            emit_json({"workspace": str(ws.root), "key_id": ws.keys.key_id})
        else:
            typer.echo(f"workspace {ws.root}\nsigning key {ws.keys.key_id}")
