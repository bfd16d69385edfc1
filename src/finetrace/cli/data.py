"""``finetrace data import|list|show|head|stats|diff``: a thin face over ``finetrace.data``."""

from __future__ import annotations

import json
import time

import typer

from .common import JSON_OPTION, console, emit_json, open_workspace
from .progress import Bars


def _progress_callback(bars):
    """The importer's rows callback, drawn by the CLI's progress bars (a count with rows/s)."""
    t0 = time.monotonic()

    def update(rows: int) -> None:
        bars("validate", rows, None, f"{rows / max(time.monotonic() - t0, 1e-9):,.0f} rows/s")

    return update


def register(app: typer.Typer) -> None:
    data = typer.Typer(help="Import, inspect and compare datasets.", no_args_is_help=True)
    app.add_typer(data, name="data")
    _import_command(data)
    _forget_command(data)
    _inspect_commands(data)


def _import_command(data: typer.Typer) -> None:
    # duplicates: alike cli/serve.py:serve_cmd on purpose (typer options passed on to the settings object, then the workspace opened).
    @data.command("import")
    def import_(
        files: list[str] = typer.Argument(
            None, help="Input files: .jsonl .json .csv .tsv .parquet (.gz/.zst), or a datasets folder."
        ),
        from_hub: str = typer.Option(
            None, "--from-hub", help="A Hub dataset ID[@revision] instead of files (offline: the local hub cache)."
        ),
        name: str = typer.Option(..., "--name", help="Dataset name; the new version is NAME@N."),
        schema: str = typer.Option(
            None, "--schema", help="completion | chat | classification | preference (default: detect)."
        ),
        input_format: str = typer.Option(
            "auto", "--format", help="auto | openai | sharegpt | alpaca | native (default: detect by content)."
        ),
        map_: list[str] = typer.Option(None, "--map", help="FIELD=COLUMN, e.g. --map prompt=question (repeatable)."),
        datasheet: str = typer.Option(
            None, "--datasheet", help="YAML with source, owner, license, … (missing ones are gaps)."
        ),
        on_error: str = typer.Option(
            "fail", "--on-error", help="fail: refuse on invalid rows; skip: drop and count them."
        ),
        pii: str = typer.Option("redact", "--pii", help="redact | flag | fail."),
        seed: int = typer.Option(0, "--seed", help="Seed of the split assignment."),
        splits: str = typer.Option("0.8,0.1,0.1", "--splits", help="train,validation,test fractions."),
        test_file: str = typer.Option(None, "--test-file", help="A held-out file used as the test split."),
        tokenizer: str = typer.Option(
            None, "--tokenizer", help="Base model ref or tokenizer folder for token lengths."
        ),
        near_dup_threshold: float = typer.Option(
            0.8, "--near-dup-threshold", help="Jaccard similarity for near-duplicates."
        ),
        near_dup: str = typer.Option("group", "--near-dup", help="group (same split) | drop (keep the first)."),
        split_unit: str = typer.Option(
            "row", "--split-unit", help="row | group (rows sharing a group value share a split)."
        ),
        prompt_format: str = typer.Option(
            "labels-first",
            "--prompt-format",
            help="classification prompts: labels-first (instruction, then text) | text-first.",
        ),
        workers: int = typer.Option(
            0, "--workers", help="Worker processes (0: automatic from the file size and CPUs)."
        ),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
        json_out: bool = JSON_OPTION,
    ):
        """Validate, clean, split and store files as a new dataset version."""
        from ..data import import_dataset
        from ..data.options import build_options
        from ..errors import ConfigError

        try:
            fractions = tuple(float(x) for x in splits.split(","))
        except ValueError:
            raise ConfigError(f"bad --splits {splits!r}", hint="e.g. --splits 0.8,0.1,0.1") from None
        if from_hub:
            from ..data.hub import resolve

            if files:
                raise ConfigError("give input files or --from-hub, not both", hint="drop one of them")
            hub_files, hub_test, hub_info = resolve(from_hub)
            files = [str(f) for f in hub_files]
            test_file = test_file or (str(hub_test) if hub_test else None)
        elif not files:
            raise ConfigError(
                "no input files given", hint="finetrace data import FILE... --name NAME, or --from-hub ID"
            )
        opts = build_options(
            None,
            schema=schema,
            from_hub=hub_info if from_hub else None,
            input_format=input_format,
            mapping=map_ or None,
            datasheet=datasheet,
            on_error=on_error,
            pii=pii,
            seed=seed,
            splits=fractions,
            test_file=test_file,
            tokenizer=tokenizer,
            near_dup_threshold=near_dup_threshold,
            near_dup=near_dup,
            split_unit=split_unit,
            prompt_format=prompt_format,
            workers=workers,
        )
        ws = open_workspace()
        t0 = time.monotonic()
        with Bars(not quiet and not json_out) as bars:
            art = import_dataset(ws, files, name, opts, progress=_progress_callback(bars))
        elapsed = time.monotonic() - t0
        md = art.metadata
        if json_out:
            emit_json({**art.to_dict(), "ref": art.ref, "seconds": round(elapsed, 3)})
            return
        rows_in = md.get("rows_in") or 0
        typer.echo(f"{art.ref}  {art.digest}")
        fmt = md.get("input_format", "native")
        typer.echo(
            f"format {fmt}"
            + (" (detected by content)" if input_format == "auto" else "")
            + (f"; from the Hub {from_hub} at commit {hub_info['commit']}" if from_hub else "")
        )
        typer.echo(
            f"schema {md['schema']}; rows in {rows_in}, out {md['rows_out']}; "
            + ", ".join(f"{k} {v}" for k, v in md["counts"].items())
            + f"; {rows_in / max(elapsed, 1e-9):,.0f} rows/s"
        )
        if md.get("gaps"):
            typer.echo(f"datasheet gaps: {', '.join(md['gaps'])} (see `finetrace data show {art.ref}`)")


def _forget_command(data: typer.Typer) -> None:
    @data.command("forget")
    def forget_(
        ref: str = typer.Argument(..., help="DATASET@V to erase rows from."),
        where: str = typer.Option(None, "--where", help="FIELD == VALUE | FIELD != VALUE | FIELD contains TEXT."),
        ids: str = typer.Option(None, "--ids", help="A file of row ids, one per line."),
        match: str = typer.Option(None, "--match", help="Rows whose text contains TEXT (case-insensitive)."),
        by: str = typer.Option(..., "--by", help="Who asked for the erasure (recorded)."),
        purge: bool = typer.Option(False, "--purge", help="Also delete the objects holding the erased rows."),
        json_out: bool = JSON_OPTION,
    ):
        """Erasure: a new version without the rows and their near-duplicates; lists what was built on the old one."""
        from pathlib import Path

        from ..data.erasure import forget

        id_set = None
        if ids is not None:
            from ..errors import InputError

            try:
                id_set = {ln.strip() for ln in Path(ids).read_text(encoding="utf-8").splitlines() if ln.strip()}
            except (OSError, UnicodeDecodeError) as exc:
                raise InputError(f"cannot read the ids file: {exc}", file=ids, hint="one id per line, UTF-8") from None
        res = forget(open_workspace(), ref, where=where, ids=id_set, match=match, by=by, purge=purge)
        if json_out:
            emit_json(res)
            return
        typer.echo(
            f"{res['dataset']}  {res['digest']}: {res['removed']} rows erased from {res['from']}, and "
            f"{res['near_duplicates']} near-duplicates of them"
        )
        if res["downstream"]:
            typer.echo(f"built on {res['from']} (retrain or withdraw these):")
            for a in res["downstream"]:
                typer.echo(f"  {a['kind']:12s} {a.get('ref') or a.get('run')}")
        else:
            typer.echo(f"nothing was built on {res['from']}")
        if res["purged"]:
            typer.echo(f"purged {len(res['purged'])} objects (the ledger keeps their digests; verify knows)")


def _inspect_commands(data: typer.Typer) -> None:
    @data.command("list")
    def list_(json_out: bool = JSON_OPTION):
        """Dataset versions in this workspace."""
        from ..data import list_datasets

        rows = list_datasets(open_workspace())
        if json_out:
            emit_json(rows)
            return
        from rich.table import Table

        t = Table("dataset", "schema", "train", "validation", "test", "gaps", "digest")
        for r in rows:
            c = r["counts"] or {}
            t.add_row(
                r["ref"],
                str(r["schema"]),
                *(str(c.get(s, 0)) for s in ("train", "validation", "test")),
                str(r["gaps"]),
                r["digest"][7:19],
            )
        console().print(t)

    @data.command("show")
    def show(ref: str = typer.Argument(..., help="NAME, NAME@N or digest."), json_out: bool = JSON_OPTION):
        """Render the datasheet: provided facts, gaps, measured facts."""
        from ..data.datasheet import render
        from ..data.versions import datasheet as get_sheet

        sheet, art = get_sheet(open_workspace(), ref)
        if json_out:
            emit_json({"ref": art.ref, "digest": art.digest, **sheet})
        else:
            typer.echo(render(sheet, f"{art.ref} ({art.digest})"))

    @data.command("head")
    def head_(
        ref: str = typer.Argument(...),
        split: str = typer.Option("train", "--split"),
        n: int = typer.Option(5, "-n", "--rows"),
        json_out: bool = JSON_OPTION,
    ):
        """The first rows of a split."""
        from ..data import head

        rows = head(open_workspace(), ref, split, n)
        if json_out:
            emit_json(rows)
        else:
            for r in rows:
                typer.echo(json.dumps({k: v for k, v in r.items() if v is not None}, ensure_ascii=False))

    @data.command("stats")
    def stats_(ref: str = typer.Argument(...), json_out: bool = JSON_OPTION):
        """Counts, labels, skipped rows, duplicates, PII, token lengths."""
        from ..data import stats

        s = stats(open_workspace(), ref)
        if json_out:
            emit_json(s)
            return
        for k in (
            "ref",
            "digest",
            "schema",
            "counts",
            "label_counts",
            "rows_in",
            "rows_out",
            "skipped",
            "dropped",
            "normalized_rows",
            "dropped_columns",
            "token_lengths",
            "gaps",
        ):
            if s.get(k) not in (None, {}, []):
                typer.echo(f"{k}: {s[k]}")
        d = s.get("duplicates") or {}
        typer.echo(
            f"duplicates: exact {d.get('exact', 0)}, near pairs {d.get('near', 0)} (threshold {d.get('threshold')})"
        )
        p = s.get("pii") or {}
        typer.echo(f"pii ({p.get('mode')}): {p.get('counts') or 'none'} in {p.get('rows', 0)} rows")

    @data.command("diff")
    def diff_(a: str = typer.Argument(...), b: str = typer.Argument(...), json_out: bool = JSON_OPTION):
        """What changed between two dataset versions."""
        from ..data import diff

        d = diff(open_workspace(), a, b)
        if json_out:
            emit_json(d)
            return
        typer.echo(f"{d['from']} → {d['to']}" + ("  (identical)" if d["same"] else ""))
        for split, c in d["splits"].items():
            typer.echo(f"  {split}: {c['from']} → {c['to']} (+{c['added']} −{c['removed']})")
        r = d["rows"]
        typer.echo(f"  all rows: +{r['added']} −{r['removed']}, {r['common']} in common")
        if d.get("labels"):
            typer.echo(f"  labels: {d['labels']}")
        if d["sources"]["added"] or d["sources"]["removed"]:
            typer.echo(f"  sources: {d['sources']}")
