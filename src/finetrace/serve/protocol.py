"""The OpenAI wire format: request models (unknown fields are accepted and ignored) and error bodies.

Errors always have the OpenAI shape ``{"error": {"message", "type", "param", "code"}}`` so that the
official client raises its matching exception (400 BadRequestError, 401 AuthenticationError, 404
NotFoundError, 429 RateLimitError, 503 InternalServerError).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import InputError
from .structured import template_message

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes at most 64 bits


def _strict(default=None, **kw):
    """A field that takes only its own JSON type: ``true`` is not the integer 1, ``"5"`` is not 5."""
    return Field(default, strict=True, **kw)


def _check_text(value: Any, path: str) -> None:
    """Refuse strings that are not valid Unicode (lone surrogates such as ``"\\ud800"``), naming the field."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(
                f"text is not valid Unicode (a lone surrogate at character {exc.start})",
                hint="send UTF-8 text; escape pairs like \\ud83d\\ude00 must come in pairs",
                field=path or None,
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, path)
            _check_text(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_text(v, f"{path}[{i}]")


class _Params(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = _strict()
    temperature: float | None = _strict()
    top_p: float | None = _strict()
    stop: str | list[str] | None = None
    seed: int | None = _strict(ge=0, le=SEED_MAX)
    stream: bool = _strict(False)
    stream_options: dict | None = None
    n: int | None = _strict()

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        _check_text(data, "")
        return data

    def checked(self, default_max: int, limit: int) -> dict:
        """Sampling parameters, validated; raises InputError naming the field."""
        max_tokens = self.max_tokens if self.max_tokens is not None else getattr(self, "max_completion_tokens", None)
        if max_tokens is None:
            max_tokens = default_max
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= limit:
            raise InputError(f"max_tokens must be between 1 and {limit}, got {max_tokens}", field="max_tokens")
        t = 1.0 if self.temperature is None else self.temperature
        if not 0 <= t <= 2:
            raise InputError(f"temperature must be between 0 and 2, got {t}", field="temperature")
        p = 1.0 if self.top_p is None else self.top_p
        if not 0 < p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {p}", field="top_p")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4 or any(not isinstance(s, str) or not s for s in stop):
            raise InputError("stop must be up to 4 non-empty strings", field="stop")
        return {"max_tokens": max_tokens, "temperature": t, "top_p": p, "seed": self.seed, "stop": stop}

    def extras(self) -> dict:
        """The choice count, logprobs and finetrace's extensions (``labels``, ``return_token_ids``), validated."""
        n = 1 if self.n is None else self.n
        if not isinstance(n, int) or not 1 <= n <= 16:
            raise InputError(f"n must be between 1 and 16, got {n}", field="n")
        if n > 1 and self.stream:
            raise InputError("n > 1 is not supported with stream: true", field="n")
        extra = self.model_extra or {}
        lp, top = extra.get("logprobs"), extra.get("top_logprobs")
        if isinstance(lp, bool) or lp is None:  # chat: logprobs: bool, top_logprobs: int
            k = int(top or 0) if lp else None
        elif isinstance(lp, int):  # completions: logprobs: int
            k = lp
        else:
            raise InputError("logprobs must be a boolean (chat) or an integer (completions)", field="logprobs")
        if k is not None and not 0 <= k <= 20:
            raise InputError(f"top_logprobs must be between 0 and 20, got {k}", field="top_logprobs")
        labels = extra.get("labels")
        if labels is not None and (
            not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels)
        ):
            raise InputError("labels must be a non-empty list of non-empty strings", field="labels")
        return {"n": n, "logprobs": k, "labels": labels, "return_token_ids": bool(extra.get("return_token_ids"))}

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict] | None = None

    def text(self, field: str = "content") -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            parts = [p.get("text", "") for p in self.content if p.get("type") == "text"]
            for j, t in enumerate(parts):
                if not isinstance(t, str):
                    raise InputError("a text part's `text` must be a string", field=f"{field}[{j}].text")
            return "".join(parts)
        return self.content or ""


class ChatRequest(_Params):
    messages: list[ChatMessage] = Field(default_factory=list)
    max_completion_tokens: int | None = _strict()

    def plain_messages(self) -> list[dict]:
        if not self.messages:
            raise InputError("messages must not be empty", field="messages")
        roles = {"system", "user", "assistant", "developer", "tool"}
        out = []
        for i, m in enumerate(self.messages):
            if m.role not in roles:
                raise InputError(f"unknown role {m.role!r}", field=f"messages[{i}].role")
            out.append(template_message(m, i))
        return out


class CompletionRequest(_Params):
    prompt: str | list[str] = ""

    def text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1 or not isinstance(self.prompt[0], str):
                raise InputError("give one prompt string (batches of prompts are not supported)", field="prompt")
            return self.prompt[0]
        return self.prompt


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
