"""Structured answers on the OpenAI wire: ``response_format`` (json_object, json_schema), ``tools`` and
``tool_choice``, ``tool`` messages, and the model's tool-call text parsed back into ``tool_calls``.

Both JSON modes and forced tool calls are enforced by constrained decoding (``decoding.constrain``): the
route compiles the schema (a bad one is a 400 naming the field) and the engine masks every step with it.

Tool-call formats understood in the model's output (the common ones; anything else stays ``content``):

- Hermes / Qwen: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (one block per call);
- a whole answer that is one JSON object ``{"name": ..., "arguments": {...}}`` (Llama-3.1 style, and the
  form a forced call, ``tool_choice: "required"`` or a named function, is constrained to); ``parameters``
  is taken for ``arguments``.
"""

from __future__ import annotations

import json
import re
import secrets

from ..errors import InputError

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def response_schema(extra: dict) -> dict | None:
    """The JSON schema ``response_format`` asks for (``json_object``: any object), or None for text."""
    rf = extra.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise InputError("response_format must be an object with a `type`", field="response_format")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise InputError(
            f"response_format.type must be text, json_object or json_schema, got {kind!r}", field="response_format.type"
        )
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        raise InputError(
            "response_format.json_schema must be an object with `name` and `schema`",
            field="response_format.json_schema",
        )
    name = spec.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise InputError(
            "response_format.json_schema.name must be 1-64 letters, digits, _ or -",
            field="response_format.json_schema.name",
        )
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise InputError(
            "response_format.json_schema.schema must be a JSON Schema object",
            field="response_format.json_schema.schema",
        )
    return schema


def tools_of(extra: dict) -> tuple[list[dict] | None, object]:
    """``(tools, tool_choice)`` checked; tools are the OpenAI function specs as the chat template takes them."""
    tools, choice = extra.get("tools"), extra.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise InputError("tool_choice needs tools", field="tool_choice")
        return None, "none"
    if not isinstance(tools, list) or not tools:
        raise InputError("tools must be a non-empty list", field="tools")
    names = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InputError(
                'each tool must be {"type": "function", "function": {"name": ..., "parameters": ...}}',
                field=f"tools[{i}]",
            )
        if not isinstance(fn.get("parameters", {}), dict):
            raise InputError(
                "a function's parameters must be a JSON Schema object", field=f"tools[{i}].function.parameters"
            )
        names.append(fn["name"])
    choice = "auto" if choice is None else choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in names:
            raise InputError(
                f"tool_choice names a function that is not in tools ({', '.join(names)})", field="tool_choice"
            )
    elif choice not in ("none", "auto", "required"):
        raise InputError(
            'tool_choice must be "none", "auto", "required" or {"type": "function", ...}', field="tool_choice"
        )
    return tools, choice


def forced_call_schema(tools: list[dict] | None, choice) -> dict | None:
    """The JSON schema a forced call (``required`` or a named function) is constrained to, else None."""
    if not tools or choice in ("none", "auto"):
        return None
    fns = [t["function"] for t in tools]
    if isinstance(choice, dict):
        fns = [f for f in fns if f["name"] == choice["function"]["name"]]

    def one(f):
        return {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": f.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }

    return one(fns[0]) if len(fns) == 1 else {"anyOf": [one(f) for f in fns]}


def template_message(m, i: int) -> dict:
    """One request message as the chat template takes it (tool calls' arguments as objects)."""
    extra = m.model_extra or {}
    out: dict = {"role": "system" if m.role == "developer" else m.role, "content": m.text(f"messages[{i}].content")}
    if m.role == "tool":
        out["tool_call_id"] = extra.get("tool_call_id")
        if extra.get("name"):
            out["name"] = extra["name"]
    calls = extra.get("tool_calls")
    if m.role == "assistant" and calls:
        if not isinstance(calls, list):
            raise InputError("tool_calls must be a list", field=f"messages[{i}].tool_calls")
        out["tool_calls"] = []
        for j, c in enumerate(calls):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise InputError("a tool call needs function.name", field=f"messages[{i}].tool_calls[{j}]")
            args = fn.get("arguments", "{}")
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except ValueError:
                raise InputError(
                    "function.arguments must be a JSON string",
                    field=f"messages[{i}].tool_calls[{j}].function.arguments",
                ) from None
            out["tool_calls"].append(
                {"id": c.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}}
            )
    return out


def _call(obj, names: set[str]) -> dict | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {
        "id": "call_" + secrets.token_hex(12),
        "type": "function",
        "function": {"name": obj["name"], "arguments": json.dumps(args) if not isinstance(args, str) else args},
    }


def parse_tool_calls(text: str, tools: list[dict]) -> tuple[str | None, list[dict]]:
    """``(content, tool_calls)`` from an answer; no recognised call: ``(text, [])``."""
    names = {t["function"]["name"] for t in tools}
    blocks = _BLOCK.findall(text)
    if blocks:
        calls = []
        for b in blocks:
            try:
                c = _call(json.loads(b), names)
            except ValueError:
                c = None
            if c is None:
                return text, []  # a malformed block: the text as it is, not half the calls
            calls.append(c)
        rest = _BLOCK.sub("", text).strip()
        return (rest or None), calls
    try:
        c = _call(json.loads(text), names)
    except ValueError:
        c = None
    return (None, [c]) if c is not None else (text, [])


def assistant_message(text: str, tools: list[dict] | None) -> tuple[dict, bool]:
    """The OpenAI ``message`` of an answer and whether it holds tool calls."""
    if not tools:
        return {"role": "assistant", "content": text}, False
    content, calls = parse_tool_calls(text, tools)
    if not calls:
        return {"role": "assistant", "content": text}, False
    return {"role": "assistant", "content": content, "tool_calls": calls}, True
