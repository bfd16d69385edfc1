"""What a generation request is, what it returns, and the one admission check every engine makes.

Shared by the native engine (``engine.py``), the gateway in front of vLLM and llama.cpp
(``engines/gateway.py``) and the OpenAI routes.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from ..decoding import BASE
from ..errors import FinetraceError, InputError


class QueueFull(FinetraceError):
    """The request queue is full; the client should retry later (HTTP 429)."""


class ShuttingDown(FinetraceError):
    """The engine is stopping and takes no new requests (HTTP 503)."""


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    provenance_id: str
    model: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None  # [(token id, log p, [(id, log p) top-k])] when asked for


@dataclass
class GenRequest:
    """One generation. ``on_event(kind, value)`` is called from the scheduler thread with
    ``("delta", str)`` for each new piece of text, then ``("done", Result)`` or ``("error", Exception)``."""

    prompt_ids: list[int]
    model: str  # public model id (base name or adapter NAME@V)
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    on_event: Callable[[str, object], None] | None = None
    input_payload: object = None  # what the client sent (messages or prompt): hashed into the log
    endpoint: str = "engine"
    provenance_id: str = field(default_factory=lambda: "ftp-" + secrets.token_hex(12))
    logprobs: int | None = None  # None: none; k: the chosen token's log p and the top k
    labels: list[str] | None = None  # classification: the answer is the best-scoring label
    chat: bool = False  # a chat turn: the answer is normalised (decoding.text) like in evaluation
    grammar: str | None = None  # a compiled JSON schema (``compile_schema``): the answer is constrained to it
    cancelled: bool = False
    # set by the engine
    adapter_name: str = BASE
    adapter_digest: str | None = None
    submitted: float = 0.0


def bind_request(engine, req: GenRequest) -> None:
    """Resolve ``req.model`` on ``engine`` (NotFoundError) and check the prompt and ``max_tokens`` fit its
    context (InputError): the one admission check of the native engine and the gateway (``GatewayEngine``)."""
    req.model, req.adapter_name, req.adapter_digest = engine.resolve_model(req.model)
    if not req.prompt_ids:
        raise InputError("the prompt is empty", field="prompt")
    if len(req.prompt_ids) + req.max_tokens > engine.context_len:
        raise InputError(
            f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the "
            f"context length {engine.context_len}",
            field="max_tokens",
        )
