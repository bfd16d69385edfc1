"""The console's FastAPI app: read-only pages over one workspace (``create_app``), and the bind rule.

Every route is a GET that opens the workspace, asks ``views`` (or a stage's public function) and renders
a Jinja template with autoescaping on. Nothing here writes to the ledger. Documents stored as Markdown
are rendered with raw HTML disabled (``audit.render.markdown_body``); stored HTML (the eval report's own
page) is served with a Content-Security-Policy that blocks scripts and every external resource.

With a token, every request must carry it: ``Authorization: Bearer TOKEN``, the ``finetrace_ui`` cookie,
or ``?token=TOKEN`` once (which sets the cookie).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from ..asgi import bearer_token
from ..audit.render import markdown_body, split_front_matter
from ..errors import FinetraceError, InputError, NotFoundError
from ..workspace import Workspace
from . import svg, views

COOKIE = "finetrace_ui"
STORED_HTML_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse a non-loopback ``host`` without a token (the console shows the whole audit record)."""
    if not is_loopback(host) and not token:
        raise InputError(
            f"refusing to serve the console on {host}, a non-loopback address, without a token: "
            f"anyone who can reach it could read the workspace's record",
            field="--host",
            hint="pass --token SECRET (or set FINETRACE_UI_TOKEN), or bind to 127.0.0.1",
        )


def _env() -> Environment:
    env = Environment(loader=PackageLoader("finetrace.web", "templates"), autoescape=select_autoescape(["html"]))
    env.filters["short"] = lambda d: (d[: 7 + 12] + "…") if isinstance(d, str) and d.startswith("sha256:") else d
    env.filters["fmt"] = lambda v: f"{v:.4g}" if isinstance(v, float) else ("n/a" if v is None else v)
    env.filters["json"] = lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)
    env.globals.update(loss_svg=svg.loss_svg, quote=quote)
    return env


def create_app(root: str | Path, token: str | None = None) -> FastAPI:
    """The console over the workspace at ``root``; ``token`` (optional) guards every request."""
    root = Path(root)
    Workspace.open(root).close()  # fail now, with the workspace's own message, not on the first request
    app = FastAPI(title="finetrace console", docs_url=None, redoc_url=None, openapi_url=None)
    env = _env()

    def workspace() -> Iterator[Workspace]:
        ws = Workspace.open(root)
        try:
            yield ws
        finally:
            ws.close()

    def page(name: str, status: int = 200, **ctx) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(workspace_root=str(root), **ctx), status_code=status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token:
            given = request.query_params.get("token")
            if given and hmac.compare_digest(given, token):
                resp = RedirectResponse(str(request.url.remove_query_params("token")), status_code=303)
                resp.set_cookie(COOKIE, token, httponly=True, samesite="strict")
                return resp
            presented = bearer_token(request.headers.get("authorization")) or request.cookies.get(COOKIE, "")
            if not hmac.compare_digest(presented.encode(), token.encode()):
                return page(
                    "error.html",
                    401,
                    title="token needed",
                    error="this console needs its token: open the address `finetrace ui` printed "
                    "(it ends in ?token=...), or send Authorization: Bearer TOKEN",
                )
        return await call_next(request)

    @app.exception_handler(FinetraceError)
    async def finetrace_error(request: Request, exc: FinetraceError):
        not_found = isinstance(exc, NotFoundError)
        return page(
            "error.html", 404 if not_found else 400, title="not found" if not_found else "error", error=str(exc)
        )

    register_pages(app, page, workspace)
    return app


def register_pages(app: FastAPI, page, workspace) -> None:
    ws_dep = Depends(workspace)

    @app.get("/", response_class=HTMLResponse)
    def runs_page(kind: str = "", ws: Workspace = ws_dep):
        runs = views.runs_timeline(ws, kind or None)
        return page("runs.html", title="Runs", runs=runs, kind=kind, timeline=svg.timeline_svg(runs))

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def run_page(run_id: str, ws: Workspace = ws_dep):
        v = views.run_view(ws, run_id)
        return page("run.html", title=f"Run {v['run'].id}", **v)

    @app.get("/artifacts", response_class=HTMLResponse)
    def artifacts_page(ws: Workspace = ws_dep):
        return page("artifacts.html", title="Artifacts", by_kind=views.artifacts_by_kind(ws))

    @app.get("/a/{ref:path}/file/{path:path}")
    def raw_file(ref: str, path: str, ws: Workspace = ws_dep):
        art = ws.ledger.resolve(ref)
        name, data = views.read_file(ws, art.digest, path)
        if name.endswith(".html"):
            return Response(
                data, media_type="text/html; charset=utf-8", headers={"Content-Security-Policy": STORED_HTML_CSP}
            )
        media = {".png": "image/png", ".pdf": "application/pdf"}.get(Path(name).suffix, "text/plain; charset=utf-8")
        return Response(
            data,
            media_type=media,
            headers={"Content-Security-Policy": STORED_HTML_CSP, "X-Content-Type-Options": "nosniff"},
        )

    @app.get("/a/{ref:path}/view/{path:path}", response_class=HTMLResponse)
    def view_file(ref: str, path: str, ws: Workspace = ws_dep):
        art = ws.ledger.resolve(ref)
        name, data = views.read_file(ws, art.digest, path)
        if not name.endswith(views.TEXT_SUFFIXES):
            return page(
                "document.html",
                title=f"{art.ref}: {name}",
                art=art,
                path=name,
                front=None,
                rendered=None,
                text=f"({len(data)} bytes, not text: open the raw file)",
            )
        text = data.decode("utf-8", errors="replace")
        front, body = split_front_matter(text) if name.endswith(".md") else (None, text)
        rendered = Markup(markdown_body(body)) if name.endswith(".md") else None
        return page(
            "document.html",
            title=f"{art.ref}: {name}",
            art=art,
            path=name,
            front=front,
            rendered=rendered,
            text=None if rendered is not None else text,
        )

    @app.get("/a/{ref:path}", response_class=HTMLResponse)
    def artifact_page(ref: str, ws: Workspace = ws_dep):
        v = views.artifact_view(ws, ref)
        return page("artifact.html", title=f"{v['artifact'].kind} {v['artifact'].ref}", **v)

    @app.get("/lineage", response_class=HTMLResponse)
    def lineage_page(ref: str = "", ws: Workspace = ws_dep):
        if not ref.strip():
            return page("lineage.html", title="Lineage", view=None, graph_svg=None, ref="")
        v = views.lineage_view(ws, ref.strip())
        graph_svg = svg.lineage_svg(v["graph"], v["root"], views.hrefs_for(v["graph"]))
        return page("lineage.html", title=f"Lineage of {v['title']}", view=v, graph_svg=graph_svg, ref=ref)

    @app.get("/reports", response_class=HTMLResponse)
    def reports_page(ws: Workspace = ws_dep):
        return page("reports.html", title="Eval reports", reports=views.eval_reports(ws))

    @app.get("/documents", response_class=HTMLResponse)
    def documents_page(ws: Workspace = ws_dep):
        return page("documents.html", title="Documents", docs=views.documents(ws))

    @app.get("/provenance", response_class=HTMLResponse)
    def provenance_page(id: str = "", ws: Workspace = ws_dep):
        from ..serve.provenance import resolve

        doc = resolve(ws, id.strip()) if id.strip() else None
        return page("provenance.html", title="Provenance", pid=id.strip(), doc=doc)

    @app.get("/ledger", response_class=HTMLResponse)
    def ledger_page(verify: int = 0, ws: Workspace = ws_dep):
        from ..ledger import verify_workspace

        report = verify_workspace(ws) if verify else None
        return page("ledger.html", title="Ledger", state=views.ledger_state(ws), report=report)

    @app.get("/attention", response_class=HTMLResponse)
    def attention_page(ws: Workspace = ws_dep):
        return page("attention.html", title="Needs a person", **views.needs_person(ws))
