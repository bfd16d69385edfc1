"""The registry over HTTP: ``create_app(settings)`` (FastAPI) and a background server for tests.

API (JSON; errors are ``{"error", "hint"}`` with 401/403/404/409/422):

    POST /api/v1/uploads                              {manifest, signature} -> {status, upload, missing}
    PUT  /api/v1/uploads/{upload}/objects/{digest}    raw bytes (re-hashed, content-checked)
    POST /api/v1/uploads/{upload}/commit              -> {status: published|exists, ref, digest}
    GET  /api/v1/packages/{ns}/{name}[/{version}]     manifest, signature, badge
    GET  /api/v1/objects/{digest}                     bytes of a committed object (an adapter's weights: a download)
    GET  /api/v1/versions/{ns}/{name}                 every version: yanked, downloads, latest
    POST /api/v1/packages/{ns}/{name}/{version}/yank  {reason, undo} (namespace owner)
    GET  /api/v1/search?q=&domain=&task=&base=&license=&min_metric=&verified=&sort=&limit=&cursor=

Web pages (server-rendered, no JavaScript): ``/`` search with filters, ``/p/{ns}/{name}[/{version}]``.
"""

from __future__ import annotations

import tempfile
from typing import Annotated

from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from ..asgi import BackgroundServer as _BackgroundServer
from ..asgi import bearer_token
from ..errors import FinetraceError, InputError, IntegrityError, NotFoundError
from . import lifecycle
from .checks import Refused
from .registry import Registry, Settings

Auth = Annotated[str | None, Header()]  # module level: annotations are resolved from the module's globals


def _status(exc: FinetraceError) -> int:
    if hasattr(exc, "http_status"):
        return exc.http_status
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, (InputError, IntegrityError)):
        return 422
    return 500


def create_app(settings: Settings, registry: Registry | None = None) -> FastAPI:
    reg = registry or Registry(settings)
    app = FastAPI(title=settings.title, docs_url=None, redoc_url=None)
    app.state.registry = reg

    @app.exception_handler(FinetraceError)
    async def _err(request: Request, exc: FinetraceError):
        return JSONResponse(
            {"error": exc.message, "hint": exc.hint, "type": type(exc).__name__}, status_code=_status(exc)
        )

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        # a bug, not bad input: one JSON line for the client (the upload was already aborted), the
        # traceback in the server log
        import logging

        logging.getLogger("finetrace.market").error("unhandled error on %s", request.url.path, exc_info=exc)
        return JSONResponse(
            {
                "error": f"internal error ({type(exc).__name__}); nothing was stored",
                "hint": "report this to the registry operator",
                "type": "InternalError",
            },
            status_code=500,
        )

    @app.get("/api/v1/health")
    def health():
        return {"ok": True, "db": reg.dialect}

    @app.post("/api/v1/uploads")
    async def start_upload(request: Request, authorization: Auth = None):
        try:
            body = await request.json()
        except ValueError:
            raise InputError("the body must be JSON {manifest, signature}") from None
        if not isinstance(body, dict):
            raise InputError("the body must be JSON {manifest, signature}")
        return reg.start_upload(bearer_token(authorization), body.get("manifest"), body.get("signature"))

    @app.put("/api/v1/uploads/{upload_id}/objects/{digest}")
    async def put_object(upload_id: str, digest: str, request: Request, authorization: Auth = None):
        # spool the body (never more than the per-file cap) and hand it to the registry in a thread
        cap = settings.limits.max_file_bytes
        with tempfile.SpooledTemporaryFile(max_size=8 << 20) as spool:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    raise Refused(f"object {digest} is larger than the per-file cap of {cap} bytes")
                spool.write(chunk)
            spool.seek(0)
            return await run_in_threadpool(reg.put_object, bearer_token(authorization), upload_id, digest, spool)

    @app.post("/api/v1/uploads/{upload_id}/commit")
    def commit(upload_id: str, authorization: Auth = None):
        return reg.commit(bearer_token(authorization), upload_id)

    @app.get("/api/v1/packages/{ns}/{name}")
    def latest(ns: str, name: str, pull: int = 0):  # pull: sent by older clients, counts nothing now
        info = reg.version(ns, name, None)
        info["badge"] = reg.badge(info)
        return info

    @app.get("/api/v1/packages/{ns}/{name}/{version}")
    def version(ns: str, name: str, version: str, pull: int = 0):
        info = reg.version(ns, name, version)
        info["badge"] = reg.badge(info)
        return info

    @app.get("/api/v1/objects/{digest}")
    def get_object(digest: str):
        path = reg.object_path(digest)
        lifecycle.count_download(reg, digest)  # a pull asks for the weights only once its own checks passed
        return FileResponse(
            path,
            media_type="application/octet-stream",
            headers={"Content-Disposition": "attachment", "X-Content-Type-Options": "nosniff"},
        )

    @app.get("/api/v1/search")
    def search(
        q: str = "",
        domain: str | None = None,
        task: str | None = None,
        base: str | None = None,
        license: str | None = None,
        min_metric: Annotated[list[str], Query()] = [],  # noqa: B006  (FastAPI copies it)
        sort: str | None = None,
        limit: int = 20,
        offset: int = 0,
        verified: bool | None = None,
        cursor: str | None = None,
    ):
        return reg.search(q, domain, task, base, license, min_metric, sort, limit, offset, verified, cursor)

    @app.get("/api/v1/versions/{ns}/{name}")
    def versions(ns: str, name: str):
        return {"package": f"{ns}/{name}", "versions": lifecycle.versions(reg, ns, name)}

    @app.post("/api/v1/packages/{ns}/{name}/{version}/yank")
    async def yank(ns: str, name: str, version: str, request: Request, authorization: Auth = None):
        body = await request.json() if await request.body() else {}
        return lifecycle.yank(
            reg,
            bearer_token(authorization),
            f"{ns}/{name}@{version}",
            str(body.get("reason", "")),
            undo=bool(body.get("undo")),
        )

    lifecycle.gc_staging(reg)  # uploads abandoned while the registry was down

    from .web import register_pages

    register_pages(app, reg, settings)
    return app


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8700) -> None:
    """Serve in the foreground until SIGINT/SIGTERM."""
    import uvicorn

    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


class BackgroundServer(_BackgroundServer):
    """``with BackgroundServer(settings) as srv: srv.url`` — a real uvicorn on a free 127.0.0.1 port."""

    what = "the registry server"

    def __init__(self, settings: Settings, registry: Registry | None = None):
        import uvicorn

        self.app = create_app(settings, registry)
        self.registry: Registry = self.app.state.registry
        super().__init__(
            uvicorn.Server(uvicorn.Config(self.app, log_level="warning")),
            name="finetrace-market",
            start_timeout=20,
            stop_timeout=20,
        )
