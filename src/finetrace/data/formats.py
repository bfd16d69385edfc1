"""Row layouts teams already have, mapped onto finetrace's schemas, detected by content.

    openai    OpenAI chat fine-tuning JSONL: {"messages": [{role, content, tool_calls, tool_call_id,
              name, weight}], "tools": [...]}; roles system/user/assistant/tool; an assistant turn
              with "weight": 0 is kept as context but carries no loss        -> chat (with tools)
    sharegpt  {"conversations": [{"from": "human"|"gpt"|"system"|"tool"|..., "value": str}]}
                                                                             -> chat (with tools)
    alpaca    {"instruction": str, "input": str (optional), "output": str}  -> completion
              prompt = instruction, then a blank line and input when input is not empty
    native    finetrace's own columns (docs/data.md)

``detect(records)`` looks at the first rows and names the layout; ``mapper(fmt)`` returns the
function that turns one record into a native record (or a ``RowError`` naming the field), used as the
importer's ``row_hook``; ``MAPPINGS[fmt]`` is the mapping recorded in the dataset's transforms.
"""

from __future__ import annotations

import functools
import json

from .readers import RowError

FORMATS = ("openai", "sharegpt", "alpaca", "native")
MAPPINGS = {
    "openai": {
        "schema": "chat",
        "messages": "messages (role, content, tool_calls, tool_call_id, name, weight)",
        "tools": "tools (JSON)",
    },
    "sharegpt": {
        "schema": "chat",
        "messages": "conversations: from -> role (human/user: user; gpt/assistant/"
        "model/chatgpt: assistant; system: system; tool/observation/function_response: tool; "
        "function_call: assistant tool call), value -> content",
        "tools": "tools (JSON)",
    },
    "alpaca": {"schema": "completion", "prompt": "instruction + ('\\n\\n' + input if input)", "completion": "output"},
}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
    "function_call": "assistant",
}
TOOL_KEYS = ("tool_calls", "tool_call_id", "name", "weight", "function_call")
DETECT_ROWS = 200


def detect(records: list[dict]) -> str:
    """The layout of the first rows: openai, sharegpt, alpaca or native (see the module docstring)."""
    for rec in records[:DETECT_ROWS]:
        if isinstance(rec.get("conversations"), list) and "messages" not in rec:
            return "sharegpt"
        if {"instruction", "output"} <= rec.keys() and "prompt" not in rec and "completion" not in rec:
            return "alpaca"
        msgs = rec.get("messages")
        if isinstance(msgs, list) and (
            "tools" in rec
            or "functions" in rec
            or any(isinstance(m, dict) and (m.get("role") == "tool" or any(k in m for k in TOOL_KEYS)) for m in msgs)
        ):
            return "openai"
    return "native"


def mapper(fmt: str):
    """A picklable function record -> native record | RowError (None for the native layout)."""
    if fmt == "native":
        return None
    return functools.partial(_MAP[fmt])


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _tool_calls(calls, where: str) -> tuple[str | None, RowError | None]:
    if calls is None:
        return None, None
    if not isinstance(calls, list) or not calls:
        return None, RowError(
            "wrong_type",
            f"{where}.tool_calls must be a non-empty list of {{id, type: function, function: {{name, arguments}}}}",
            "messages",
        )
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            return None, RowError("wrong_type", f"{where}.tool_calls[{j}] needs function.name (a string)", "messages")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                return None, RowError(
                    "wrong_type",
                    f"{where}.tool_calls[{j}].function.arguments is not JSON; "
                    "write the arguments as a JSON object (or a string holding one)",
                    "messages",
                )
        if not isinstance(args, dict):
            return None, RowError(
                "wrong_type", f"{where}.tool_calls[{j}].function.arguments must be a JSON object", "messages"
            )
        out.append(
            {
                "id": str(c.get("id") or f"call_{j}"),
                "type": "function",
                "function": {"name": fn["name"], "arguments": args},
            }
        )
    return _canonical(out), None


def _tools(rec: dict) -> tuple[str | None, RowError | None]:
    tools = rec.get("tools")
    if tools is None and rec.get("functions") is not None:  # the older "functions" list
        tools = (
            [{"type": "function", "function": f} for f in rec["functions"]]
            if isinstance(rec["functions"], list)
            else rec["functions"]
        )
    if tools is None:
        return None, None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        return None, RowError(
            "wrong_type",
            "'tools' must be a list of tool objects ({type: function, function: {name, description, parameters}})",
            "tools",
        )
    return _canonical(tools), None


def map_openai(rec: dict):
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return RowError("missing_field", "the required field 'messages' is missing or empty", "messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return RowError("wrong_type", f"{where} must be an object with a string 'role'", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                return RowError(
                    "wrong_type",
                    f"{where}.content parts must all be {{type: text, text: str}} "
                    "(images and audio cannot be trained on here)",
                    "messages",
                )
            content = "".join(p["text"] for p in content)
        if content is not None and not isinstance(content, str):
            return RowError("wrong_type", f"{where}.content must be a string or null", "messages")
        calls = m.get("tool_calls")
        if calls is None and isinstance(m.get("function_call"), dict):  # the older single function_call
            calls = [{"id": "call_0", "type": "function", "function": m["function_call"]}]
        calls, err = _tool_calls(calls, where)
        if err:
            return err
        weight = m.get("weight")
        if weight is not None and (isinstance(weight, bool) or weight not in (0, 1)):
            return RowError("wrong_type", f"{where}.weight must be 0 or 1, got {weight!r}", "messages")
        if weight is not None and m["role"] != "assistant":
            return RowError("wrong_type", f"{where}.weight is only allowed on assistant messages", "messages")
        tcid = m.get("tool_call_id")
        name = m.get("name")
        if (tcid is not None and not isinstance(tcid, str)) or (name is not None and not isinstance(name, str)):
            return RowError("wrong_type", f"{where}.tool_call_id and name must be strings", "messages")
        out.append(
            {
                "role": m["role"],
                "content": content if content is not None else "",
                "tool_calls": calls,
                "tool_call_id": tcid,
                "name": name,
                "weight": weight,
            }
        )
    tools, err = _tools(rec)
    if err:
        return err
    return {"messages": out, "tools": tools, "id": rec.get("id"), "group": rec.get("group")}


def map_sharegpt(rec: dict):
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        return RowError("missing_field", "the required field 'conversations' is missing or empty", "conversations")
    msgs = []
    if isinstance(rec.get("system"), str) and rec["system"].strip():
        msgs.append({"role": "system", "content": rec["system"]})
    for i, turn in enumerate(conv):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("from"), str)
            or not isinstance(turn.get("value"), str)
        ):
            return RowError(
                "wrong_type", f"conversations[{i}] must be an object with string 'from' and 'value'", "conversations"
            )
        role = SHAREGPT_ROLES.get(turn["from"].lower())
        if role is None:
            return RowError(
                "bad_role",
                f"conversations[{i}] has from {turn['from']!r}; known: {', '.join(sorted(SHAREGPT_ROLES))}",
                "conversations",
            )
        if turn["from"].lower() == "function_call":
            try:
                call = json.loads(turn["value"])
            except json.JSONDecodeError:
                return RowError(
                    "wrong_type",
                    f"conversations[{i}] (function_call) value must be JSON {{name, arguments}}",
                    "conversations",
                )
            msgs.append(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": f"call_{i}", "type": "function", "function": call}],
                }
            )
        else:
            msgs.append({"role": role, "content": turn["value"]})
    tools = rec.get("tools")
    if isinstance(tools, str):  # ShareGPT files often hold the tool list as JSON text
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            return RowError("wrong_type", "'tools' is a string that is not JSON", "tools")
    return map_openai({"messages": msgs, "tools": tools, "id": rec.get("id"), "group": rec.get("group")})


def map_alpaca(rec: dict):
    for f in ("instruction", "output"):
        if not isinstance(rec.get(f), str):
            return RowError("missing_field" if rec.get(f) is None else "wrong_type", f"'{f}' must be a string", f)
    inp = rec.get("input")
    if inp is not None and not isinstance(inp, str):
        return RowError("wrong_type", "'input' must be a string", "input")
    prompt = rec["instruction"] + (f"\n\n{inp}" if inp and inp.strip() else "")
    return {"prompt": prompt, "completion": rec["output"], "id": rec.get("id"), "group": rec.get("group")}


_MAP = {"openai": map_openai, "sharegpt": map_sharegpt, "alpaca": map_alpaca}
