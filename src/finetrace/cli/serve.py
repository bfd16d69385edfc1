"""``finetrace serve``, ``finetrace provenance ID`` and ``finetrace export-model``."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import InputError
from .common import JSON_OPTION, emit_json, open_workspace


def _read_keys(path: str | None) -> list[str]:
    if not path:
        return []
    p = Path(path)
    if not p.is_file():
        raise InputError(f"no such file: {p}", field="--api-keys-file")
    return [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def register(app: typer.Typer) -> None:
    # duplicates: alike cli/data.py:import_ on purpose (typer options passed on to the settings object, then the workspace opened).
    # duplicates: alike cli/train.py:train_cmd on purpose (typer option declarations).
    # duplicates: alike cli/ui.py:ui_cmd on purpose (typer option declarations of a secret taken from the environment).
    @app.command("serve")
    def serve_cmd(
        base: str = typer.Option(..., "--base", help="Base model (name, name@N or digest)."),
        adapter: list[str] = typer.Option([], "--adapter", help="Adapter NAME@V to serve (repeatable)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
        port: int = typer.Option(8000, "--port", help="TCP port."),
        api_key: list[str] = typer.Option([], "--api-key", help="Accepted bearer key (repeatable)."),
        api_keys_file: str = typer.Option(None, "--api-keys-file", help="File with one key per line."),
        admin_key: str = typer.Option(
            None,
            "--admin-key",
            envvar="FINETRACE_ADMIN_KEY",
            help="Key for /admin (hot load/unload); without it admin is off.",
        ),
        log_content: bool = typer.Option(False, "--log-content", help="Log full prompt/answer text too."),
        max_queue: int = typer.Option(64, "--max-queue", help="Waiting requests before answering 429."),
        max_batch: int = typer.Option(16, "--max-batch", help="Rows decoded together."),
        prefix_cache_mb: int = typer.Option(
            256,
            "--prefix-cache-mb",
            help="Memory for prompts already read, reused by prompts that start alike (0: off).",
        ),
        require_eval: bool = typer.Option(False, "--require-eval", help="Refuse adapters that have no eval verdict."),
        drain_s: float = typer.Option(
            30.0, "--drain-s", help="On SIGTERM: seconds for in-flight requests, then 503 shutting_down."
        ),
        ledger_timeout_s: float = typer.Option(
            5.0, "--ledger-timeout-s", help="Longest wait on the ledger before events are spilled."
        ),
        max_request_bytes: int = typer.Option(
            8 * 1024 * 1024, "--max-request-bytes", help="Largest request body; a larger one gets 413."
        ),
        engine: str = typer.Option("native", "--engine", help="native (default), llamacpp or vllm."),
        upstream: str = typer.Option(None, "--upstream", help="With --engine vllm: attach to a running vLLM at URL."),
        upstream_key: str = typer.Option(
            None, "--upstream-key", envvar="FINETRACE_UPSTREAM_KEY", help="Bearer key the upstream engine expects."
        ),
        engine_threads: int = typer.Option(2, "--engine-threads", help="CPU threads of the llama.cpp engine."),
    ):
        """Serve the base and adapters over an OpenAI-compatible API, with provenance on every answer."""
        import logging

        from ..serve.server import build_engine, serve
        from ..serve.settings import ServeSettings

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        settings = ServeSettings(
            host=host,
            port=port,
            api_keys=list(api_key) + _read_keys(api_keys_file),
            admin_key=admin_key,
            log_content=log_content,
            max_queue=max_queue,
            max_batch=max_batch,
            prefix_cache_mb=prefix_cache_mb,
            require_eval=require_eval,
            drain_s=drain_s,
            ledger_timeout_s=ledger_timeout_s,
            max_request_bytes=max_request_bytes,
        )
        ws = open_workspace()
        eng = build_engine(ws, base, adapter, settings, engine, upstream, upstream_key, engine_threads)
        serve(eng, settings)

    @app.command("provenance")
    def provenance_cmd(
        provenance_id: str = typer.Argument(..., help="The provenance id of an answer."), json_out: bool = JSON_OPTION
    ):
        """What stands behind a served answer: deployment, adapter, training run, data, eval, approvals."""
        from ..serve.provenance import render, resolve

        doc = resolve(open_workspace(), provenance_id)
        if json_out:
            emit_json(doc)
        else:
            typer.echo("\n".join(render(doc)))

    @app.command("export-model")
    def export_cmd(
        adapter: str = typer.Argument(..., help="Adapter NAME@V (or digest)."),
        merged: bool = typer.Option(False, "--merged", help="Merge the adapter into the base weights."),
        out: str = typer.Option(..., "-o", "--out", help="Folder to write (new or empty)."),
        gguf: str = typer.Option(None, "--gguf", help="Also write model.gguf: f32 or q8_0."),
        json_out: bool = JSON_OPTION,
    ):
        """Export an adapter as a merged safetensors model that transformers (and converters) load."""
        from ..serve.export import export_merged

        if not merged:
            raise InputError("only --merged export is available", hint="add --merged", field="--merged")
        ws = open_workspace()
        res = export_merged(ws, adapter, out, gguf=gguf)
        if json_out:
            emit_json(res)
        else:
            typer.echo(f"wrote {res['path']} ({res['ref']}, {res['digest']})")
