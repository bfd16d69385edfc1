"""What every command group shares: the chosen workspace, JSON output, tables."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import typer

from ..workspace import Workspace


@dataclass
class State:
    workspace: str | None = None


STATE = State()

JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON.")


def open_workspace() -> Workspace:
    return Workspace.open(STATE.workspace)


def emit_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def console():
    from rich.console import Console

    return Console(highlight=False)
