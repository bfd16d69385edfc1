"""``finetrace verify``, ``log``, ``show``, ``lineage``, ``checkpoint``: reading and checking the ledger."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..canonical import short
from ..errors import IntegrityError, NotFoundError
from ..ledger import lineage as lineage_of
from ..ledger import verify_workspace
from ..ledger.lineage import render_tree
from .common import JSON_OPTION, console, emit_json, open_workspace


def verify(
    target: str = typer.Argument(None, help="A bundle .zip to verify offline (default: the workspace)."),
    checkpoint: list[Path] = typer.Option(
        [],
        "--checkpoint",
        help="An exported checkpoint the log (or the bundle) must extend; it also pins the signing key.",
    ),
    key: str = typer.Option(None, "--key", help="The key id (sha256:...) the bundle must be signed by."),
    rebuild_index: bool = typer.Option(False, "--rebuild-index", help="Rebuild the index from the log first."),
    json_out: bool = JSON_OPTION,
):
    """Recompute every ledger entry, root, checkpoint and object digest; exit non-zero on the first mismatch.

    Prints the signing key id and which guarantees held, failed or could not be checked (those that
    need a checkpoint kept outside the workspace)."""
    if target:
        from ..audit import verify_bundle  # provided by the audit stage

        report = verify_bundle(Path(target), expected_key_id=key, checkpoints=checkpoint)
    else:
        ws = open_workspace()
        if rebuild_index:
            ws.ledger.rebuild_index()
        report = verify_workspace(ws, checkpoint)
        if key and report.key_id != key:
            report.problems.insert(0, f"the ledger is signed by key {report.key_id}, not by {key}")
    if json_out:
        emit_json(report.to_dict())
    else:
        typer.echo(
            f"signed by key {report.key_id or 'unknown'}"
            + ("" if key or report.key_id is None else " (pin it with --key or --checkpoint)")
        )
        for k, v in report.checks.items():
            typer.echo(f"checked {v} {k.replace('_', ' ')}")
        for v in getattr(report, "verified", []):
            typer.echo(f"ok: {v}")
        for g in report.guarantees:
            typer.echo(f"{g['status']:>11}: {g['guarantee']}: {g['detail']}")
        for p in report.problems:
            typer.echo(f"FAIL: {p}", err=True)
        if report.ok:
            typer.echo("verify: OK")
    if not report.ok:
        raise IntegrityError(
            f"verification failed: {report.problems[0]}"
            + (f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else "")
        )


def log(
    kind: str = typer.Option(None, "--kind", help="Only runs of this kind (train, import, ...)."),
    entries: bool = typer.Option(False, "--entries", help="Show raw ledger entries instead of runs."),
    limit: int = typer.Option(50, "--limit", help="At most this many (newest last)."),
    json_out: bool = JSON_OPTION,
):
    """List runs (or raw ledger entries), oldest first."""
    ws = open_workspace()
    if entries:
        items = list(ws.ledger.entries())[-limit:]
        if json_out:
            emit_json([{"seq": e.seq, "type": e.type, "time": e.time, "actor": e.actor, "data": e.data} for e in items])
            return
        for e in items:
            typer.echo(f"{e.seq:6d}  {e.time[:19]}  {e.type:16s} {e.actor}")
        return
    runs = ws.ledger.runs(kind)[-limit:]
    if json_out:
        emit_json([r.to_dict() for r in runs])
        return
    from rich.table import Table

    t = Table("run", "kind", "status", "started", "actor", "inputs", "outputs")
    for r in runs:
        outs = ", ".join(ws.ledger.artifact(d).ref for d in r.outputs)
        t.add_row(r.id, r.kind, r.status, r.started[:19], r.actor or "", str(len(r.inputs)), outs)
    console().print(t)


def show(
    ref: str = typer.Argument(..., help="An artifact (name@N, name, digest) or a run id."), json_out: bool = JSON_OPTION
):
    """Show an artifact (kind, aliases, metadata, producing run) or a run (config, environment, metrics)."""
    ws = open_workspace()
    try:
        obj = ws.ledger.resolve(ref).to_dict()
    except NotFoundError:  # not an artifact: a run id, or neither (get_run says so)
        obj = ws.ledger.get_run(ref).to_dict()
    if json_out:
        emit_json(obj)
    else:
        typer.echo(json.dumps(obj, indent=2, sort_keys=True))


def lineage(
    ref: str = typer.Argument(..., help="Artifact: name@N, name or digest."),
    direction: str = typer.Option("both", "--direction", help="up, down or both."),
    json_out: bool = JSON_OPTION,
):
    """What an artifact was made from (upstream) and what was made from it (downstream)."""
    ws = open_workspace()
    art = ws.ledger.resolve(ref)
    graph = lineage_of(ws.ledger, art.digest, direction)
    if json_out:
        emit_json(graph)
        return
    if direction in ("up", "both"):
        typer.echo("upstream:")
        for line in render_tree(graph, "up"):
            typer.echo("  " + line)
    if direction in ("down", "both"):
        typer.echo("downstream:")
        for line in render_tree(graph, "down"):
            typer.echo("  " + line)


def checkpoint(
    export: Path = typer.Option(None, "--export", help="Also write the signed checkpoint here."),
    json_out: bool = JSON_OPTION,
):
    """Sign the current tree head; export it somewhere you do not control alone (an auditor's copy)."""
    ws = open_workspace()
    cp = ws.checkpoint()
    if export:
        from ..atomic import write_text

        write_text(export, json.dumps(cp.to_dict(), indent=2) + "\n")
    if json_out:
        emit_json(cp.to_dict())
    else:
        typer.echo(f"checkpoint size {cp.size} root {cp.root[:16]}… signed by {short(cp.key_id)}")


def register(app: typer.Typer) -> None:
    """Add the ledger commands to ``app``."""
    app.command("verify")(verify)
    app.command("log")(log)
    app.command("show")(show)
    app.command("lineage")(lineage)
    app.command("checkpoint")(checkpoint)
