"""``finetrace ui [--host 127.0.0.1] [--port 8765] [--token T]``: the read-only web console."""

from __future__ import annotations

import secrets

import typer

from .common import STATE


def register(app: typer.Typer) -> None:
    # duplicates: alike cli/serve.py:serve_cmd on purpose (typer option declarations of a secret taken from the environment).
    @app.command("ui")
    def ui_cmd(
        host: str = typer.Option(
            "127.0.0.1", "--host", help="Interface to listen on (loopback by default; any other address needs --token)."
        ),
        port: int = typer.Option(8765, "--port", help="TCP port."),
        token: str = typer.Option(
            None,
            "--token",
            envvar="FINETRACE_UI_TOKEN",
            help="Secret every request must carry (required off loopback).",
        ),
        new_token: bool = typer.Option(False, "--new-token", help="Make up a random token and print it."),
    ):
        """Serve the read-only audit console: runs, artifacts, lineage, eval reports, documents, provenance."""
        import uvicorn

        from ..web import check_bind, create_app
        from ..workspace import resolve_path

        token = token or (secrets.token_urlsafe(24) if new_token else None)
        check_bind(host, token)
        root = resolve_path(STATE.workspace)
        web = create_app(root, token)
        shown = f"[{host}]" if ":" in host else host
        typer.echo(f"finetrace console for {root}: http://{shown}:{port}/" + (f"?token={token}" if token else ""))
        uvicorn.run(web, host=host, port=port, log_level="warning")
