"""Row validation: column mapping, schema auto-detection, and one check per schema.

``RowValidator(schema, mapping).check(record)`` returns ``(row, None)`` with a row holding exactly the
schema's columns (plus ``id``/``group`` when given, as strings), or ``(None, RowError)`` naming the field
and what is wrong. Nothing is coerced silently: a label that is not a string is an error, not a cast.
"""

from __future__ import annotations

import difflib
import json

from ..errors import InputError
from .readers import RowError
from .schemas import OPTIONAL_COLUMNS, SCHEMAS

ROLES = ("system", "user", "assistant")
# when a record could be two schemas, the one with more required columns present wins only if unique
_DETECT_ORDER = ("chat", "preference", "classification", "completion")


def parse_mapping(items: list[str] | dict | None) -> dict[str, str]:
    """``["prompt=question", ...]`` (CLI) or a dict → ``{field: column}``."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items:
        field, sep, column = item.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise InputError(f"bad --map {item!r}", hint="write --map FIELD=COLUMN, e.g. --map prompt=question")
        out[field.strip()] = column.strip()
    return out


def apply_mapping(record: dict, mapping: dict[str, str]) -> dict:
    if not mapping:
        return record
    rec = dict(record)
    for field, column in mapping.items():
        if column in record:
            rec[field] = rec.pop(column) if column not in mapping else record[column]
    return rec


def detect_schema(columns: list[str]) -> str:
    """The one schema whose required columns are all present, else an InputError that says what to do."""
    cols = set(columns)
    matches = [s for s in _DETECT_ORDER if set(SCHEMAS[s]) <= cols]
    if "preference" in matches and "completion" not in matches:
        matches = ["preference"]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise InputError(
            f"the columns ({', '.join(sorted(cols))}) fit several schemas: {', '.join(matches)}",
            hint="choose one with --schema",
        )
    need = "; ".join(f"{s}: {', '.join(SCHEMAS[s])}" for s in SCHEMAS)
    hint = "pass --schema and map columns with --map FIELD=COLUMN"
    guess = suggest_mapping(cols)
    if guess:
        hint += f" (e.g. --schema {guess[0]} " + " ".join(f"--map {f}={c}" for f, c in guess[1].items()) + ")"
    raise InputError(
        f"cannot tell the schema from the columns {', '.join(sorted(cols)) or '(none)'}; the schemas need {need}",
        field=None,
        hint=hint,
    )


SYNONYMS = {
    "prompt": ("question", "instruction", "input", "query", "source", "context"),
    "completion": ("answer", "output", "response", "target", "reply"),
    "text": ("sentence", "content", "input", "document", "body"),
    "label": ("class", "category", "target", "labels", "intent"),
    "messages": ("conversations", "conversation", "chat", "dialog", "turns"),
    "chosen": ("preferred", "good", "winner"),
    "rejected": ("dispreferred", "bad", "loser"),
}


def suggest_mapping(cols: set[str]) -> tuple[str, dict[str, str]] | None:
    """A schema and --map items that would make ``cols`` fit, from common column names."""
    lower = {c.lower(): c for c in cols}
    for schema in ("chat", "preference", "classification", "completion"):
        mapping, used = {}, set()
        for f in SCHEMAS[schema]:
            if f in cols:
                continue
            hit = next((lower[s] for s in SYNONYMS.get(f, ()) if s in lower and lower[s] not in used), None)
            if hit is None:
                break
            mapping[f] = hit
            used.add(hit)
        else:
            if mapping:
                return schema, mapping
    return None


def _is_text(value: str) -> bool:
    """False for a string holding a NUL character (binary or UTF-16 data read as text) or a lone UTF-16
    surrogate (JSON "\\ud800"): neither is text."""
    if "\x00" in value:
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _surrogate(what: str, field: str) -> RowError:
    return RowError(
        "encoding",
        f"{what} holds a NUL character or a lone UTF-16 surrogate (a \\ud800-\\udfff "
        "escape without its pair), which is not text (binary or UTF-16 data?); fix or remove it",
        field,
    )


class RowValidator:
    """Checks and reshapes records for one schema."""

    def __init__(self, schema: str, mapping: dict[str, str] | None = None, tools: bool = False):
        if schema not in SCHEMAS:
            raise InputError(f"unknown schema {schema!r}", hint=f"one of {', '.join(SCHEMAS)}")
        self.schema = schema
        self.mapping = mapping or {}
        self.required = SCHEMAS[schema]
        self.dropped: set[str] = set()  # extra columns seen (recorded, not kept)
        self.tools = tools  # chat with tool calls, a tool role and per-turn weights (formats.py)

    def check(self, record: dict) -> tuple[dict | None, RowError | None]:
        rec = apply_mapping(record, self.mapping)
        row: dict = {}
        for field in self.required:
            if field not in rec or rec[field] is None:
                hint = self._missing_hint(field, rec)
                return None, RowError("missing_field", f"the required field '{field}' is missing{hint}", field)
            value = rec[field]
            if field == "messages":
                value, err = self._tool_messages(value) if self.tools else self._messages(value)
                if err:
                    return None, err
            elif not isinstance(value, str):
                return None, RowError(
                    "wrong_type",
                    f"'{field}' must be a string, got {type(value).__name__} {json.dumps(value, default=str)[:60]}",
                    field,
                )
            elif not value.strip():
                return None, RowError("empty_field", f"'{field}' is empty", field)
            elif not _is_text(value):
                return None, _surrogate(field, field)
            row[field] = value
        for field in OPTIONAL_COLUMNS:
            value = rec.get(field)
            if isinstance(value, (dict, list)):
                return None, RowError("wrong_type", f"'{field}' must be a string or number", field)
            row[field] = None if value is None or value == "" else str(value)
            if row[field] is not None and not _is_text(row[field]):
                return None, _surrogate(field, field)
        if self.tools:
            row["tools"] = rec.get("tools")
        extra = rec.keys() - row.keys()
        if extra and not extra <= self.dropped:
            self.dropped |= extra
        return row, None

    def _missing_hint(self, field: str, rec: dict) -> str:
        cols = sorted(str(k) for k in rec)
        close = difflib.get_close_matches(field, cols, 1, 0.5)
        have = f" (the row has {', '.join(cols)})" if cols else ""
        return have + (f"; map it with --map {field}={close[0]}" if close else "")

    def _messages(self, value) -> tuple[list | None, RowError | None]:
        if isinstance(value, str):  # CSV cells hold the list as JSON text
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                return None, RowError(
                    "wrong_type",
                    "'messages' must be a list of {role, content} objects (a string that is not JSON was given)",
                    "messages",
                )
        if not isinstance(value, list) or not value:
            return None, RowError("wrong_type", "'messages' must be a non-empty list of {role, content}", "messages")
        out = []
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return None, RowError(
                    "wrong_type", f"messages[{i}] must be an object with string 'role' and 'content'", "messages"
                )
            if m["role"] not in ROLES:
                return None, RowError(
                    "bad_role", f"messages[{i}] has role {m['role']!r}; roles are {', '.join(ROLES)}", "messages"
                )
            if m["role"] == "system" and i != 0:
                return None, RowError("bad_role", f"messages[{i}]: a system message may only come first", "messages")
            if not _is_text(m["content"]):
                return None, _surrogate(f"messages[{i}].content", "messages")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            return None, RowError("bad_role", "the conversation has no assistant message to learn from", "messages")
        return out, None

    def _tool_messages(self, value) -> tuple[list | None, RowError | None]:
        """Messages mapped by ``formats.map_openai``: roles include ``tool``; an assistant turn may hold
        only tool calls; ``weight`` 0 marks an assistant turn that carries no loss."""
        out = []
        for i, m in enumerate(value):
            role = m["role"]
            if role not in ROLES + ("tool",):
                return None, RowError(
                    "bad_role", f"messages[{i}] has role {role!r}; roles are {', '.join(ROLES + ('tool',))}", "messages"
                )
            if role == "system" and i != 0:
                return None, RowError("bad_role", f"messages[{i}]: a system message may only come first", "messages")
            if m.get("tool_calls") and role != "assistant":
                return None, RowError("bad_role", f"messages[{i}]: only assistant messages make tool calls", "messages")
            if not all(_is_text(m.get(k) or "") for k in ("content", "tool_calls", "tool_call_id", "name")):
                return None, _surrogate(f"messages[{i}]", "messages")
            if not m["content"].strip() and not m.get("tool_calls") and role != "tool":
                return None, RowError("empty_field", f"messages[{i}] has neither content nor tool calls", "messages")
            out.append(dict(m))
        if not any(m["role"] == "assistant" and m.get("weight") != 0 for m in out):
            return None, RowError(
                "bad_role",
                "the conversation has no assistant message to learn from (none, or all with weight 0)",
                "messages",
            )
        return out, None
