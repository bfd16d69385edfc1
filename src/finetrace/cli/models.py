"""``finetrace models add|list`` and ``finetrace generate``: thin faces over ``finetrace.models``."""

from __future__ import annotations

import sys
import time

import typer

from ..canonical import short
from .common import JSON_OPTION, console, emit_json, open_workspace


def _params(n) -> str:
    if not isinstance(n, int):
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _source(meta: dict) -> str:
    src = meta.get("source") or {}
    kind = src.get("type", "?")
    detail = src.get("requirement") or src.get("repo_id") or src.get("path") or ""
    return f"{kind} {detail}".strip()


def _row(art) -> dict:
    m = art.metadata
    return {
        "name": art.ref,
        "aliases": art.aliases,
        "digest": art.digest,
        "architecture": m.get("architecture"),
        "parameters": m.get("parameters"),
        "context_length": m.get("context_length"),
        "dtype": m.get("dtype"),
        "source": m.get("source"),
        "created": art.created,
    }


def register(app: typer.Typer) -> None:
    models = typer.Typer(
        help="Base models: add (catalog name, GGUF file, HF folder, hub id) and list.", no_args_is_help=True
    )
    app.add_typer(models, name="models")

    @models.command("add")
    def add(
        source: str = typer.Argument(
            ...,
            help="Catalog name (smollm2-135m-instruct), a .gguf file, a Hugging "
            "Face folder with safetensors, or a hub id org/name.",
        ),
        name: str = typer.Option(None, "--name", help="Alias to record (default: derived from the source)."),
        json_out: bool = JSON_OPTION,
    ):
        """Fetch or read a base model, convert it once to safetensors, and record it as a base_model."""
        from ..models import add_model

        ws = open_workspace()
        t0 = time.perf_counter()
        art = add_model(ws, source, name)
        seconds = time.perf_counter() - t0
        if json_out:
            emit_json({**_row(art), "seconds": round(seconds, 3)})
            return
        m = art.metadata
        typer.echo(f"{art.ref}  {art.digest}")
        typer.echo(
            f"  {m.get('architecture')}, {_params(m.get('parameters'))} parameters, "
            f"{m.get('layers')} layers, hidden {m.get('hidden_size')}, vocab {m.get('vocab_size')}, "
            f"context {m.get('context_length')}, {m.get('dtype')}"
        )
        typer.echo(f"  source: {_source(m)}  ({seconds:.1f} s)")

    @models.command("list")
    def list_(json_out: bool = JSON_OPTION):
        """List the base models recorded in this workspace."""
        from ..models import list_models

        arts = list_models(open_workspace())
        if json_out:
            emit_json([_row(a) for a in arts])
            return
        if not arts:
            typer.echo("no base models yet (add one: finetrace models add smollm2-135m-instruct)")
            return
        from rich.table import Table

        t = Table("name", "digest", "architecture", "params", "context", "dtype", "source")
        for a in arts:
            m = a.metadata
            t.add_row(
                ", ".join(a.aliases) or "-",
                short(a.digest),
                str(m.get("architecture")),
                _params(m.get("parameters")),
                str(m.get("context_length")),
                str(m.get("dtype")),
                _source(m),
            )
        console().print(t)

    # duplicates: alike models/generate.py:generate on purpose (the CLI loads and streams itself to time the load and the reply apart).
    @app.command("generate")
    def generate(
        prompt: str = typer.Argument(..., help="The user message."),
        model: str = typer.Option(..., "--model", "-m", help="Base model: name, name@N or digest."),
        max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Stop after this many tokens."),
        system: str = typer.Option(None, "--system", help="A system message (default: the template's own)."),
        adapter: str = typer.Option(
            None, "--adapter", help="A PEFT adapter: a folder, or a recorded adapter (name, name@N, digest)."
        ),
        temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy (default)."),
        seed: int = typer.Option(None, "--seed", help="Seed for sampling (with --temperature > 0)."),
        stats_out: bool = typer.Option(False, "--stats", help="Print token counts and speed to stderr."),
    ):
        """Answer PROMPT with a base model using its chat template, streaming tokens to stdout."""
        from ..models.generate import ChatStats, chat_messages, load_for_chat, stream_chat

        ws = open_workspace()
        t0 = time.perf_counter()
        mdl, tok, art = load_for_chat(ws, model, adapter)
        t1 = time.perf_counter()
        stats = ChatStats()
        for piece in stream_chat(
            mdl,
            tok,
            chat_messages(prompt, system),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            stats=stats,
        ):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        t2 = time.perf_counter()
        if stats_out:
            rate = stats.new_tokens / (t2 - t1) if t2 > t1 else 0.0
            typer.echo(
                f"[{art.ref}: load {t1 - t0:.1f} s, {stats.prompt_tokens} prompt + {stats.new_tokens} new "
                f"tokens in {t2 - t1:.1f} s ({rate:.1f} tokens/s), finish: {stats.finish_reason}]",
                err=True,
            )
