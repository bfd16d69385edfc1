"""``finetrace parity ADAPTER``: replay the eval set through the serving path and compare (serve/parity.py)."""

from __future__ import annotations

import typer

from .common import JSON_OPTION, emit_json, open_workspace


def register(app: typer.Typer) -> None:
    @app.command("parity")
    def parity_cmd(
        adapter: str = typer.Argument(..., help="Adapter NAME@V (or digest) as it would be served."),
        engine: str = typer.Option("native", "--engine", help="Serving engine to replay on: native, llamacpp or vllm."),
        upstream: str = typer.Option(None, "--upstream", help="With --engine vllm: a running vLLM's URL."),
        report: str = typer.Option(
            None, "--report", help="Eval report to compare with (default: the latest that evaluated this adapter)."
        ),
        min_agreement: float = typer.Option(
            None, "--min-agreement", help="Exit 1 below this agreement (default 1.0 native)."
        ),
        json_out: bool = JSON_OPTION,
    ):
        """Replay the eval set's prompts through the serving engine; token-exact on native, else a rate."""
        from ..serve.parity import DEFAULT_MIN_AGREEMENT, parity

        res = parity(open_workspace(), adapter, engine, report, upstream=upstream)
        floor = DEFAULT_MIN_AGREEMENT.get(engine, 0.95) if min_agreement is None else min_agreement
        if json_out:
            emit_json(res.to_dict())
        else:
            typer.echo(
                f"parity {res.agreeing}/{res.n} ({res.agreement:.1%}) "
                f"{'token-exact' if res.exact else 'differ'} on {engine}; run {res.run_id}"
            )
            for d in res.differing[:10]:
                typer.echo(f"  example {d['i']} ({d['id']}): eval {d['eval']!r} served {d['served']!r}")
        if res.agreement < floor:
            raise typer.Exit(1)
