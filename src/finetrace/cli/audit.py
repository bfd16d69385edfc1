"""``finetrace docs``, ``approve``, ``reproduce``, ``export``: a thin face over ``finetrace.audit``.

(``finetrace verify BUNDLE.zip`` lives with the other verify command in ``cli/ledger.py`` and calls
``finetrace.audit.verify_bundle``.)
"""

from __future__ import annotations

from pathlib import Path

import typer

from .common import JSON_OPTION, emit_json, open_workspace


def register(app: typer.Typer) -> None:
    @app.command("docs")
    def docs(
        adapter: str = typer.Argument(..., help="The adapter, NAME@V (or a digest)."),
        fmt: list[str] = typer.Option(
            ["md", "html"], "--format", "-f", help="md, html or pdf (repeatable; pdf needs headless Chromium)."
        ),
        intended_use: Path = typer.Option(
            None,
            "--intended-use",
            help="YAML with intended_use, limitations (required) and optional "
            "provider, license, human_oversight, risks, ... keys.",
        ),
        out: Path = typer.Option(None, "-o", "--out", help="Also write the files to this folder."),
        oms: bool = typer.Option(
            False,
            "--oms",
            help="Also sign the adapter in the OpenSSF model-signing "
            "format (key mode; needs the model-signing package).",
        ),
        json_out: bool = JSON_OPTION,
    ):
        """Generate the model card, Annex IV documentation, AB 2013 and EU training-data summaries, the
        CycloneDX ML-BOM and the signed provenance attestation, from the ledger; record them."""
        from ..audit import generate_documents

        ws = open_workspace()
        formats = tuple(dict.fromkeys(x.strip() for f in fmt for x in f.split(",") if x.strip()))
        arts = generate_documents(ws, adapter, intended_use=intended_use, formats=formats, out=out, oms=oms)
        if json_out:
            emit_json([a.to_dict() for a in arts])
            return
        for a in arts:
            typer.echo(f"{a.ref:40s} {a.digest}  {', '.join(a.metadata.get('files', []))}")
        missing = arts[0].metadata.get("intended_use_missing") if arts else None
        if missing:
            typer.echo(
                f"warning: intended use not provided ({', '.join(missing)}); the documents say so and "
                "publishing will refuse this adapter. Pass --intended-use FILE.yaml.",
                err=True,
            )
        if out:
            typer.echo(f"written to {out}")

    @app.command("approve")
    def approve_cmd(
        adapter: str = typer.Argument(..., help="The adapter, NAME@V."),
        by: str = typer.Option(..., "--as", help="Full name of the responsible person."),
        note: str = typer.Option(..., "--note", help="What was checked and approved."),
        report: str = typer.Option(None, "--report", help="The eval report (default: the latest of the adapter)."),
        json_out: bool = JSON_OPTION,
    ):
        """Sign and record a dated approval of the adapter's evaluation report (Annex IV 2(g))."""
        from ..audit import approve

        ws = open_workspace()
        e = approve(ws, adapter, by, note, report)
        if json_out:
            emit_json({"seq": e.seq, "time": e.time, **e.data})
            return
        typer.echo(
            f"approval by {e.data['by']} of report {e.data['report_ref']} for {e.data['adapter_ref']} "
            f"recorded as ledger entry {e.seq} ({e.data['date']}), signed by {e.data['key_id']}"
        )

    @app.command("reproduce")
    def reproduce_cmd(
        run: str = typer.Argument(..., help="A recorded train or evaluate run id (see `finetrace log`)."),
        json_out: bool = JSON_OPTION,
    ):
        """Re-execute a recorded run from the ledger alone and report bit-identical or the largest difference."""
        from ..audit import reproduce

        ws = open_workspace()
        res = reproduce(ws, run)
        if json_out:
            emit_json(res.to_dict())
            return
        typer.echo(f"reproduced {res.kind} run {res.run_id} as {res.reproduced_run_id}")
        for c in res.files:
            mark = "identical" if c.identical else f"differs (max |diff| {c.max_abs_diff})"
            typer.echo(f"  {c.path:30s} {mark}" + (f"  {c.note}" if c.note else ""))
        for n in res.notes:
            typer.echo(f"  note: {n}")
        typer.echo(
            "result: BIT-IDENTICAL"
            if res.bit_identical
            else f"result: DIFFERENT, largest absolute difference {res.max_abs_diff}"
        )
        typer.echo(f"recorded as run {res.record_run_id}")

    @app.command("export")
    def export_cmd(
        adapter: str = typer.Argument(..., help="The adapter, NAME@V."),
        out: Path = typer.Option(..., "-o", "--out", help="The bundle file to write (.zip)."),
        intended_use: Path = typer.Option(
            None, "--intended-use", help="Used only if the adapter has no documents yet."
        ),
        json_out: bool = JSON_OPTION,
    ):
        """Write an audit bundle that `finetrace verify BUNDLE.zip` checks on a machine with no workspace."""
        from ..audit import export_bundle

        ws = open_workspace()
        path = export_bundle(ws, adapter, out, intended_use=intended_use)
        if json_out:
            emit_json({"bundle": str(path), "bytes": path.stat().st_size, "key_id": ws.keys.key_id})
            return
        typer.echo(f"wrote {path} ({path.stat().st_size:,} bytes); key id {ws.keys.key_id}")
