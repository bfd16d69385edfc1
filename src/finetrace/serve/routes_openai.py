"""The OpenAI-compatible routes of ``finetrace serve`` (models, chat and text completions) and the
translation of ``FinetraceError`` into OpenAI error bodies; ``app.create_app`` adds them to its app.

Routes only translate: HTTP <-> ``GenRequest``. A request is one engine row, or (n > 1, logprobs,
labels, token ids) several gathered into one answer; streaming answers are SSE.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import FinetraceError, InputError, NotFoundError
from .engine import Engine
from .protocol import ChatRequest, CompletionRequest, error_body
from .registry import DeploymentRefused
from .request import GenRequest, QueueFull, Result, ShuttingDown
from .settings import ServeSettings
from .structured import assistant_message, forced_call_schema, response_schema, tools_of

HEADER = "X-Finetrace-Provenance"

RETRY_AFTER_S = 1  # what a 429 (queue full) and a 503 (shutting down) tell the client to wait


class ApiError(Exception):
    """An error answered as an OpenAI error body with ``status`` (and ``headers``)."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, code, param), headers


def translate(exc: FinetraceError) -> ApiError:
    """The HTTP status and OpenAI error body for a FinetraceError."""
    msg = str(exc)
    if isinstance(exc, QueueFull):
        return ApiError(429, msg, "rate_limit_error", "queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, ShuttingDown):
        return ApiError(503, msg, "server_error", "shutting_down", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, DeploymentRefused):
        return ApiError(403, msg, "permission_error", "adapter_refused")
    if isinstance(exc, NotFoundError):
        code = "model_not_found" if "model" in exc.message.lower() else "not_found"
        return ApiError(404, msg, "invalid_request_error", code)
    if isinstance(exc, InputError):
        return ApiError(400, msg, "invalid_request_error", "invalid_value", exc.field)
    return ApiError(500, msg, "server_error")


def add_openai_routes(app: FastAPI, engine: Engine, settings: ServeSettings, require_key) -> None:
    """Add /v1/models, /v1/chat/completions and /v1/completions to ``app``, behind ``require_key``."""

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    def models():
        return _list_models(engine)

    @app.get("/v1/models/{model:path}", dependencies=[Depends(require_key)])
    def model_info(model: str):
        return _model_info(engine, model)

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat(body: ChatRequest, request: Request):
        return await _chat(engine, settings, body, request)

    @app.post("/v1/completions", dependencies=[Depends(require_key)])
    async def completions(body: CompletionRequest, request: Request):
        return await _completions(engine, settings, body, request)


def _list_models(engine: Engine) -> dict:
    """The body of GET /v1/models."""
    created = int(time.time())
    return {
        "object": "list",
        "data": [
            {
                "id": m["id"],
                "object": "model",
                "created": created,
                "owned_by": "finetrace",
                **{k: v for k, v in m.items() if k != "id"},
            }
            for m in engine.models()
        ],
    }


def _model_info(engine: Engine, model: str) -> dict:
    """The body of GET /v1/models/{model}."""
    mid = engine.resolve_model(model)[0]
    m = next(x for x in engine.models() if x["id"] == mid)
    return {
        "id": mid,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "finetrace",
        **{k: v for k, v in m.items() if k != "id"},
    }


async def _chat(engine: Engine, settings: ServeSettings, body: ChatRequest, request: Request):
    """Handle POST /v1/chat/completions."""
    params = body.checked(settings.default_max_tokens, settings.max_tokens_limit)
    messages = body.plain_messages()
    ext = body.extras()
    tools, grammar = await _structure(engine, body, ext)
    # a huge prompt must not stall the loop
    ids = await asyncio.to_thread(engine.encode_chat, messages, tools)
    req = GenRequest(
        ids,
        body.model,
        endpoint="chat.completions",
        input_payload={"messages": messages},
        chat=True,
        logprobs=ext["logprobs"],
        labels=ext["labels"],
        grammar=grammar,
        **params,
    )
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if _needs_choices(ext, body.stream):
        return await _many(engine, req, ext, "chat.completion", cid, created)

    def final(res: Result) -> dict:
        message, called = assistant_message(res.text, tools)
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": res.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "tool_calls" if called else _finish(res),
                    "logprobs": None,
                }
            ],
            "usage": _usage(res),
            "provenance_id": res.provenance_id,
            "system_fingerprint": engine.deployment,
        }

    def chunk(delta: str | None, res: Result | None) -> dict:
        d = (
            {"role": "assistant", "content": ""}
            if delta is None and res is None
            else ({} if res is not None else {"content": delta})
        )
        return {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": req.model,
            "choices": [{"index": 0, "delta": d, "finish_reason": _finish(res) if res else None, "logprobs": None}],
            "provenance_id": req.provenance_id,
            "system_fingerprint": engine.deployment,
        }

    return await _respond(engine, req, body, chunk, final, request)


async def _completions(engine: Engine, settings: ServeSettings, body: CompletionRequest, request: Request):
    """Handle POST /v1/completions."""
    params = body.checked(settings.default_max_tokens, settings.max_tokens_limit)
    prompt = body.text()
    if not prompt:
        raise InputError("prompt must not be empty", field="prompt")
    ids = await asyncio.to_thread(engine.encode_text, prompt)  # a huge prompt must not stall the loop
    ext = body.extras()
    req = GenRequest(
        ids,
        body.model,
        endpoint="completions",
        input_payload={"prompt": prompt},
        logprobs=ext["logprobs"],
        labels=ext["labels"],
        **params,
    )
    cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if _needs_choices(ext, body.stream):
        return await _many(engine, req, ext, "text_completion", cid, created)

    def final(res: Result) -> dict:
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": res.model,
            "choices": [{"index": 0, "text": res.text, "finish_reason": _finish(res), "logprobs": None}],
            "usage": _usage(res),
            "provenance_id": res.provenance_id,
            "system_fingerprint": engine.deployment,
        }

    def chunk(delta: str | None, res: Result | None):
        if delta is None and res is None:
            return None
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": req.model,
            "choices": [
                {"index": 0, "text": delta or "", "finish_reason": _finish(res) if res else None, "logprobs": None}
            ],
            "provenance_id": req.provenance_id,
            "system_fingerprint": engine.deployment,
        }

    return await _respond(engine, req, body, chunk, final, request)


async def _run(
    engine: Engine, req: GenRequest, stream: bool, make_chunk, make_final, request: Request, include_usage: bool = False
):
    """Submit ``req`` and answer it: one JSON body, or (``stream``) an SSE response of chunks; a final usage
    chunk too when ``include_usage``."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    req.on_event = lambda kind, value: loop.call_soon_threadsafe(q.put_nowait, (kind, value))
    engine.submit(req)  # raises QueueFull / NotFoundError / InputError before anything is sent
    headers = {HEADER: req.provenance_id}
    if not stream:
        watch = asyncio.ensure_future(_client_gone(request, req))
        try:
            while True:
                kind, value = await q.get()
                if kind == "done":
                    return JSONResponse(make_final(value), headers=headers)
                if kind == "error":
                    if isinstance(value, FinetraceError):
                        raise value
                    raise ApiError(500, f"generation failed: {value}", "server_error")
        except asyncio.CancelledError:
            req.cancelled = True
            raise
        finally:
            watch.cancel()

    async def events():
        try:
            first = make_chunk(None, None)
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            while True:
                kind, value = await q.get()
                if kind == "delta":
                    yield f"data: {json.dumps(make_chunk(value, None))}\n\n"
                elif kind == "done":
                    yield f"data: {json.dumps(make_chunk('', value))}\n\n"
                    usage = make_final(value).get("usage")
                    if include_usage:
                        chunk = make_chunk("", None)
                        chunk["choices"], chunk["usage"] = [], usage
                        yield f"data: {json.dumps(chunk)}\n\n"
                    break
                else:
                    err = (
                        translate(value)
                        if isinstance(value, FinetraceError)
                        else ApiError(500, f"generation failed: {value}", "server_error")
                    )
                    yield f"data: {json.dumps(err.body)}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client went away, or we finished: either way the row must not linger
            req.cancelled = True

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _usage(res: Result) -> dict:
    return {
        "prompt_tokens": res.prompt_tokens,
        "completion_tokens": res.completion_tokens,
        "total_tokens": res.prompt_tokens + res.completion_tokens,
    }


async def _many(engine: Engine, req: GenRequest, ext: dict, obj: str, cid: str, created: int):
    """n choices (each its own request, seeds seed, seed+1, ...), logprobs, labels, token ids."""
    reqs = [req] + [
        dataclasses.replace(
            req, provenance_id="ftp-" + secrets.token_hex(12), seed=None if req.seed is None else req.seed + i
        )
        for i in range(1, ext["n"])
    ]
    results = await _gather(engine, reqs)
    choices = [_choice(engine, obj, i, res, ext) for i, res in enumerate(results)]
    usage = {"prompt_tokens": results[0].prompt_tokens, "completion_tokens": sum(r.completion_tokens for r in results)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    body = {
        "id": cid,
        "object": obj,
        "created": created,
        "model": results[0].model,
        "choices": choices,
        "usage": usage,
        "provenance_id": results[0].provenance_id,
        "provenance_ids": [r.provenance_id for r in results],
        "system_fingerprint": engine.deployment,
    }
    return JSONResponse(body, headers={HEADER: results[0].provenance_id})


async def _gather(engine: Engine, reqs: list[GenRequest]) -> list[Result]:
    loop = asyncio.get_running_loop()
    futs = [loop.create_future() for _ in reqs]

    def settle(f, kind, value):
        if f.done():
            return
        if kind == "done":
            f.set_result(value)
        else:
            f.set_exception(
                value
                if isinstance(value, FinetraceError)
                else ApiError(500, f"generation failed: {value}", "server_error")
            )

    for r, f in zip(reqs, futs):
        r.on_event = lambda kind, value, f=f: (
            loop.call_soon_threadsafe(settle, f, kind, value) if kind in ("done", "error") else None
        )
    try:
        for r in reqs:
            engine.submit(r)
        return list(await asyncio.gather(*futs))
    except BaseException:
        for r in reqs:
            r.cancelled = True
        raise


async def _structure(engine: Engine, body: ChatRequest, ext: dict) -> tuple[list[dict] | None, str | None]:
    """The tools to render (``ext["tools"]`` too) and the compiled grammar (response_format, a forced call)."""
    extra = body.model_extra or {}
    tools, choice = tools_of(extra)
    schema, field = forced_call_schema(tools, choice), "tools"
    if schema is None:
        schema, field = response_schema(extra), "response_format.json_schema.schema"
    if schema is not None and ext["labels"]:
        raise InputError("labels cannot be combined with response_format or a forced tool call", field="labels")
    ext["tools"] = tools if choice != "none" else None
    if ext["tools"] and body.stream:
        raise InputError("tools need stream: false (tool calls are parsed from the whole answer)", field="stream")
    grammar = await asyncio.to_thread(engine.compile_schema, schema, field) if schema is not None else None
    return ext["tools"], grammar


def _choice(engine: Engine, obj: str, i: int, res: Result, ext: dict) -> dict:
    lp = _logprobs(engine, res, obj) if ext["logprobs"] is not None else None
    called = False
    if obj == "chat.completion":
        message, called = assistant_message(res.text, ext.get("tools"))
        c = {"index": i, "message": message}
    else:
        c = {"index": i, "text": res.text}
    c.update(finish_reason="tool_calls" if called else _finish(res), logprobs=lp)
    if ext["return_token_ids"]:
        c["token_ids"] = res.token_ids
    return c


def _piece(engine: Engine, t) -> str:
    return t if isinstance(t, str) else engine.tokenizer.decode([t])


def _logprobs(engine: Engine, res: Result, obj: str) -> dict:
    rows = res.logprobs or []
    if obj == "chat.completion":

        def one(t, v):
            text = _piece(engine, t)
            return {"token": text, "logprob": v, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**one(t, v), "top_logprobs": [one(a, b) for a, b in top]} for t, v, top in rows]}
    tokens = [_piece(engine, t) for t, _, _ in rows]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [v for _, v, _ in rows],
        "top_logprobs": [{_piece(engine, a): b for a, b in top} for _, _, top in rows],
        "text_offset": offsets,
    }


async def _respond(engine: Engine, req, body, chunk, final, request):
    return await _run(engine, req, body.stream, chunk, final, request, body.include_usage)


async def _client_gone(request: Request, req: GenRequest) -> None:
    """Wait for the client of a non-streaming request to disconnect, then cancel its generation: the
    engine stops decoding it and logs it ``cancelled`` and not delivered."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    req.cancelled = True


def _needs_choices(ext: dict, stream: bool) -> bool:
    """True when the answer needs the multi-choice path (n, logprobs, labels, token ids)."""
    special = ext["logprobs"] is not None or ext["labels"] or ext["return_token_ids"]
    if stream and special:
        raise InputError("logprobs, labels and return_token_ids need stream: false", field="stream")
    return ext["n"] > 1 or bool(special)


def _finish(res: Result) -> str:
    return "stop" if res.finish_reason == "cancelled" else res.finish_reason
