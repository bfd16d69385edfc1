"""The ``finetrace`` command: a thin face over the stage entry points.

Each command group lives in its own module and registers itself in ``COMMAND_MODULES`` order; a module
exposes ``register(app)``. Errors from the library (``FinetraceError``) become one line on stderr and the
error's exit code here, at the edge, and nowhere else.
"""

from __future__ import annotations

import importlib
import sqlite3
import sys

import typer

from ..errors import FinetraceError
from ..memory import prefer_huge_pages

COMMAND_MODULES = (
    "workspace",
    "ledger",
    "models",
    "data",
    "train",
    "evaluate",
    "audit",
    "serve",
    "market",
    "pipeline",
    "ui",
    "tracking",
    "new",
    "parity",
)

app = typer.Typer(
    name="finetrace",
    no_args_is_help=True,
    add_completion=False,
    help="Fine-tune, evaluate, document and serve domain adapters with a verifiable audit trail.",
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    workspace: str = typer.Option(
        None, "--workspace", "-w", envvar="FINETRACE_WORKSPACE", help="Workspace folder (default ./.finetrace)."
    ),
):
    from . import common

    common.STATE.workspace = workspace


def _load() -> None:
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # that stage has no commands yet
            raise
        mod.register(app)


_load()


def main(argv: list[str] | None = None) -> int:
    prefer_huge_pages()  # before any command imports torch (see finetrace.memory)
    try:
        code = app(args=argv, prog_name="finetrace", standalone_mode=False)
        if isinstance(code, int) and code:
            return code  # e.g. 130: typer returns (not raises) the code of an interrupted command
    except FinetraceError as exc:
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except sqlite3.DatabaseError as exc:  # damage found after the ledger opened (a corrupt page)
        typer.echo(
            f"error: a database is damaged (SQLite: {exc}); restore it from a backup and run `finetrace verify`",
            err=True,
        )
        return 3
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except (typer.Exit, SystemExit) as exc:  # click's own exits (e.g. --help)
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        return int(code or 0)
    except Exception as exc:  # click's usage errors (typer vendors click, so match by shape)
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            return exc.exit_code
        raise
    return 0


def entry() -> None:
    sys.exit(main())
