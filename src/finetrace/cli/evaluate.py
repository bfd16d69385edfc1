"""``finetrace eval``, ``finetrace compare`` and ``finetrace override``: a thin face over ``finetrace.evaluate``."""

from __future__ import annotations

import typer

from .common import JSON_OPTION, emit_json, open_workspace


def _summary(ws, art) -> dict:
    from ..evaluate import read_report

    rep = read_report(ws, art.digest)
    return {
        "report": art.digest,
        "ref": art.ref,
        "run_id": rep.run_id,
        "models": [
            {
                "ref": m.ref,
                "metrics": d["metrics"],
                "vs_base": d.get("vs_base"),
                "bias_flip_rate": m.bias.flip_rate if m.bias else None,
                "forgetting": d.get("forgetting"),
                "gates": d.get("gates"),
                "passed": m.passed,
            }
            for m, d in ((m, m.to_dict()) for m in rep.models)
        ],
    }


def _print(summary: dict) -> None:
    from .common import console

    out = console()
    for m in summary["models"]:
        line = ", ".join(f"{k} {v['value']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]" for k, v in m["metrics"].items())
        out.print(f"[bold]{m['ref']}[/bold]: {line}")
        for k, d in (m.get("vs_base") or {}).items():
            if k != "mcnemar":
                out.print(
                    f"  {k} vs base: {d['delta']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] p={d['p_value']:.3g}"
                )
        if m.get("bias_flip_rate") is not None:
            out.print(f"  counterfactual flip rate: {m['bias_flip_rate']:.3f}")
        if m.get("forgetting"):
            f = m["forgetting"]
            out.print(
                f"  general-text perplexity: base {f['base_perplexity']:.2f} -> {f['tuned_perplexity']:.2f} "
                f"({f['increase']:+.1%})"
            )
        for g in m.get("gates") or []:
            mark = "ok  " if g["passed"] else "FAIL"
            val = "n/a" if g["value"] is None else f"{g['value']:.4g}"
            out.print(
                f"  {mark} {g['name']}: {val} {g['op']} {g['threshold']}" + (f" ({g['note']})" if g.get("note") else "")
            )
        if m.get("gates"):
            out.print(f"  verdict: {'[green]passed[/green]' if m['passed'] else '[red]FAILED[/red]'}")
    out.print(f"report {summary['ref']} ({summary['report']})")


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        model: str = typer.Option(..., "--model", help="Base model (name, name@N or digest)."),
        data: str = typer.Option(..., "--data", help="Dataset NAME@V[:split] (default split from the suite)."),
        adapter: str = typer.Option(None, "--adapter", help="Adapter NAME@V to evaluate against the base."),
        suite: str = typer.Option(None, "--suite", help="Suite YAML (metrics, bias, gates)."),
        name: str = typer.Option(None, "--name", help="Name for the eval_report (default eval-DATASET)."),
        json_out: bool = JSON_OPTION,
    ):
        """Evaluate a base model, or an adapter against its base; record the report and gate verdict."""
        from ..evaluate import evaluate
        from .progress import Bars

        ws = open_workspace()
        with Bars() as bars:
            art = evaluate(ws, model, data, adapter_ref=adapter, suite=suite, name=name, progress=bars)
        summary = _summary(ws, art)
        emit_json(summary) if json_out else _print(summary)

    @app.command("compare")
    def compare_cmd(
        model: str = typer.Option(..., "--model", help="Base model (name, name@N or digest)."),
        adapter: list[str] = typer.Option(..., "--adapter", help="Adapter NAME@V (repeatable)."),
        data: str = typer.Option(..., "--data", help="Dataset NAME@V[:split]."),
        suite: str = typer.Option(None, "--suite", help="Suite YAML (metrics, bias, gates)."),
        name: str = typer.Option(None, "--name", help="Name for the eval_report."),
        json_out: bool = JSON_OPTION,
    ):
        """Base vs one or more adapters on the same examples, side by side, with paired tests."""
        from ..evaluate import compare
        from .progress import Bars

        ws = open_workspace()
        with Bars() as bars:
            art = compare(ws, model, list(adapter), data, suite=suite, name=name, progress=bars)
        summary = _summary(ws, art)
        emit_json(summary) if json_out else _print(summary)

    @app.command("override")
    def override_cmd(
        adapter: str = typer.Argument(..., help="Adapter NAME@V (or digest) whose failed gates to override."),
        as_: str = typer.Option(..., "--as", help="Full name of the person taking responsibility."),
        reason: str = typer.Option(..., "--reason", help="Why this adapter may go further despite its gates."),
        json_out: bool = JSON_OPTION,
    ):
        """Record a named override of an adapter's failed eval gates (itself a ledger event)."""
        from ..errors import InputError
        from ..ledger.clearance import clearance, record_override

        ws = open_workspace()
        art = ws.ledger.resolve(adapter, kind="adapter")
        before = clearance(ws.ledger, art.digest)
        if before.status != "failed":
            raise InputError(
                f"{art.ref} is {before.status}, not failed: there is nothing to override",
                hint="an override applies to an adapter whose latest eval gates failed",
            )
        record_override(ws.ledger, art.digest, as_, reason)
        after = clearance(ws.ledger, art.digest)
        if json_out:
            emit_json({"adapter": art.digest, "ref": art.ref, "status": after.status, "detail": after.detail})
        else:
            typer.echo(f"{art.ref}: {after.status} ({after.detail})")
