"""``create_app(engine, settings)``: the OpenAI-compatible HTTP face of the engine (FastAPI).

    GET  /health                         open: liveness + queue depth
    GET  /metrics                        Prometheus text (API key when keys are set)
    GET  /v1/models                      the base and every loaded adapter
    POST /v1/chat/completions            OpenAI chat, streaming (SSE) or not
    POST /v1/completions                 OpenAI text completion, streaming or not
    GET  /v1/provenance/{id}             what stands behind an answer (see provenance.py)
    POST /admin/adapters                 {"adapter": "NAME@V"}: verify + hot-load (admin key)
    DELETE /admin/adapters/{model}       unload after its in-flight requests (admin key)

Routes only translate: HTTP <-> ``GenRequest`` and ``FinetraceError`` -> OpenAI error bodies. The app
starts the engine (recording the deploy run) on startup and stops it, finishing in-flight requests, on
shutdown. The OpenAI routes and error translation live in ``routes_openai.py``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..asgi import bearer_token
from ..errors import FinetraceError
from . import provenance
from .engine import Engine
from .engines.process import EngineUnavailable
from .protocol import error_body
from .routes_openai import RETRY_AFTER_S, ApiError, add_openai_routes
from .routes_openai import translate as _translate
from .settings import ServeSettings

log = logging.getLogger("finetrace.serve")

__all__ = ["RETRY_AFTER_S", "ApiError", "LoadAdapter", "create_app"]  # the first two now live in routes_openai


class _BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 before anything parses it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return msg

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps(
            error_body(
                f"the request body is larger than {self.limit} bytes", "invalid_request_error", "request_too_large"
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class LoadAdapter(BaseModel):
    adapter: str


def create_app(engine: Engine, settings: ServeSettings | None = None) -> FastAPI:
    """The app: lifespan (engine start/stop), body limit, error translation, then each group of routes."""
    settings = settings or engine.settings
    if not settings.api_keys:
        log.warning(
            "no API key configured: the /v1 endpoints are open to anyone who can reach %s:%s",
            settings.host,
            settings.port,
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(engine.start)
        try:
            yield
        finally:  # uvicorn has already waited for in-flight HTTP requests; drain what the engine holds
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="finetrace serve", lifespan=lifespan)
    app.add_middleware(_BodyLimit, limit=settings.max_request_bytes)
    add_error_handlers(app)
    keys = Keys(settings)
    add_operational_routes(app, engine, keys.require_key)
    add_openai_routes(app, engine, settings, keys.require_key)  # /v1/models, /v1/chat/completions, /v1/completions
    add_provenance_routes(app, engine, keys.require_key)
    add_admin_routes(app, engine, keys.require_admin)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error becomes an OpenAI error body: ApiError as raised, FinetraceError translated (an engine
    that is not answering: 503), validation errors 400, a bug 500 without a traceback to the client."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(FinetraceError)
    async def _ft_error(request: Request, exc: FinetraceError):
        err = (
            ApiError(503, str(exc), "server_error", "engine_unavailable", headers={"Retry-After": "1"})
            if isinstance(exc, EngineUnavailable)
            else _translate(exc)
        )
        return JSONResponse(err.body, status_code=err.status, headers=err.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug: logged here, never a traceback to the client
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body(f"internal error ({type(exc).__name__})", "server_error"), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(
            error_body(str(exc.detail), type_, "not_found" if exc.status_code == 404 else None),
            status_code=exc.status_code,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(
            error_body(f"invalid request: {first.get('msg', exc)}", "invalid_request_error", "invalid_value", param),
            status_code=400,
        )


def bearer(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None."""
    return bearer_token(request.headers.get("authorization"))


class Keys:
    """The two route dependencies: ``require_key`` (any API key, when keys are set) and ``require_admin``."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings

    def require_key(self, request: Request) -> None:
        if not self.settings.api_keys:
            return
        key = bearer(request)
        if not key or not any(hmac.compare_digest(key, k) for k in self.settings.api_keys):
            raise ApiError(
                401,
                "Incorrect or missing API key: send `Authorization: Bearer <key>`",
                "invalid_request_error",
                "invalid_api_key",
            )

    def require_admin(self, request: Request) -> None:
        if not self.settings.admin_key:
            raise ApiError(
                403,
                "admin endpoints are disabled: start the server with --admin-key",
                "permission_error",
                "admin_disabled",
            )
        key = bearer(request)
        if not key or not hmac.compare_digest(key, self.settings.admin_key):
            raise ApiError(401, "Incorrect or missing admin key", "invalid_request_error", "invalid_api_key")


def add_operational_routes(app: FastAPI, engine, require_key) -> None:
    """/health (open; 503 ``engine_down`` while a gateway's engine process is not answering) and /metrics."""

    @app.get("/health")
    def health():
        ok = getattr(engine, "healthy", True)  # a gateway engine reports its engine process
        body = {
            "status": "ok" if ok else "engine_down",
            "base": engine.base_id,
            "deployment": engine.deployment,
            **engine.stats(),
        }
        return body if ok else JSONResponse(body, status_code=503)

    @app.get("/metrics", dependencies=[Depends(require_key)])
    def metrics():
        s = engine.stats()
        gauges = {
            "finetrace_queue_depth": ("Requests waiting for a batch slot.", s["queued"]),
            "finetrace_active_rows": ("Rows in the running batch.", s["active"]),
            "finetrace_adapters_loaded": ("Adapters loaded on the base.", s["adapters"]),
        }
        if "prefix_cache_hit_tokens" in s:  # the native engine (a gateway's engine keeps its own)
            gauges["finetrace_prefix_cache_hit_tokens"] = (
                "Prompt tokens not read again since start, thanks to the prefix cache.",
                s["prefix_cache_hit_tokens"],
            )
        text = engine.metrics.render(gauges)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


def add_provenance_routes(app: FastAPI, engine, require_key) -> None:
    @app.get("/v1/provenance/{provenance_id}", dependencies=[Depends(require_key)])
    def get_provenance(provenance_id: str):
        if engine.request_log is not None:
            engine.request_log.flush()
        with engine.ledger_lock:  # the workspace's ledger connection is shared with the engine
            return provenance.resolve(engine.ws, provenance_id)


def add_admin_routes(app: FastAPI, engine, require_admin) -> None:
    @app.post("/admin/adapters", dependencies=[Depends(require_admin)], status_code=201)
    def load_adapter(body: LoadAdapter):
        info = engine.load_adapter(body.adapter)
        return {
            "id": info.ref,
            "digest": info.digest,
            "clearance": info.clearance.status,
            "detail": info.clearance.detail,
        }

    @app.delete("/admin/adapters/{model:path}", dependencies=[Depends(require_admin)])
    def unload_adapter(model: str):
        return {"id": engine.unload_adapter(model), "unloaded": True}
