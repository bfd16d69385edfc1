"""Dataset schemas and how a row becomes a conversation: the contract between data, train and evaluate.

A ``dataset`` artifact is a folder::

    dataset.json        {"schema", "columns", "labels" and "prompt_format" (classification), "counts": {split: n}, ...}
    train.parquet       one Parquet file per split (train, validation, test; absent splits omitted)
    validation.parquet
    test.parquet
    datasheet.json      the datasheet (given facts + measured facts + gaps)

Columns per schema (``id`` and ``group`` are optional everywhere and carried through):

    completion      prompt: str, completion: str
    chat            messages: list of {role: str, content: str}  (roles system/user/assistant)
    classification  text: str, label: str
    preference      prompt: str, chosen: str, rejected: str

``to_example`` renders a row as (prompt messages, target text): training puts the loss on the target
only (followed by the end-of-turn token), and evaluation generates from the prompt messages and compares
with the target. One function for both, so the two stages never disagree about the format.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMAS: dict[str, tuple[str, ...]] = {
    "completion": ("prompt", "completion"),
    "chat": ("messages",),
    "classification": ("text", "label"),
    "preference": ("prompt", "chosen", "rejected"),
}
OPTIONAL_COLUMNS = ("id", "group")
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    messages: list[dict]  # the prompt, as chat messages, ending with a user turn
    target: str  # the assistant's answer to learn / to compare with
    rejected: str | None = None  # preference data only
    group: str | None = None
    id: str | None = None


# How a classification row becomes a prompt (``dataset.json`` key ``prompt_format``). labels-first puts the
# instruction, the same for every row, before the text, so that every prompt of a dataset starts with the
# same system turn and instruction: the decoder reads that beginning once (label scoring's shared prefix,
# the prefix cache of a server) and only the text after it. text-first is the format of datasets imported
# before the key existed (no key: text-first), kept so that their adapters are evaluated and served on the
# prompts they were trained on.
PROMPT_FORMATS = ("labels-first", "text-first")
LEGACY_PROMPT_FORMAT = "text-first"


CHOICES = "Answer with one of: "


def classification_prompt(text: str, labels: list[str], prompt_format: str | None = None) -> str:
    choices = f"{CHOICES}{', '.join(labels)}."
    fmt = prompt_format or LEGACY_PROMPT_FORMAT
    if fmt == "labels-first":
        return f"{choices}\n\n{text}"
    if fmt == "text-first":
        return f"{text}\n\n{choices}"
    raise ValueError(f"unknown prompt_format {prompt_format!r} (one of {', '.join(PROMPT_FORMATS)})")


def split_instruction(content: str) -> tuple[str, str]:
    """(instruction, text) of a labels-first classification prompt; ("", content) for any other prompt.
    What a counterfactual template wraps is the text, not the instruction before it."""
    if content.startswith(CHOICES):
        head, sep, text = content.partition("\n\n")
        if sep:
            return head + sep, text
    return "", content


def to_example(row: dict, schema: str, labels: list[str] | None = None, prompt_format: str | None = None) -> Example:
    """Render one dataset row as prompt messages and a target answer (``prompt_format``: a classification
    dataset's, from its ``dataset.json``; None: text-first, as before the key existed)."""
    group, rid = row.get("group"), row.get("id")
    rid = None if rid is None else str(rid)
    if schema == "completion":
        return Example([{"role": "user", "content": row["prompt"]}], row["completion"], None, group, rid)
    if schema == "classification":
        if not labels:
            raise ValueError("classification rows need the dataset's label set")
        return Example(
            [{"role": "user", "content": classification_prompt(row["text"], labels, prompt_format)}],
            str(row["label"]),
            None,
            group,
            rid,
        )
    if schema == "preference":
        return Example([{"role": "user", "content": row["prompt"]}], row["chosen"], row["rejected"], group, rid)
    if schema == "chat":
        msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            raise ValueError("a chat row needs at least one assistant message")
        return Example(msgs[:last], msgs[last]["content"], None, group, rid)
    raise ValueError(f"unknown schema {schema!r}")


def conversation(row: dict) -> tuple[list[dict], list | None, list[bool]]:
    """A chat row as the chat template takes it: (messages, tools, trainable) where ``trainable[i]`` is
    True for an assistant turn that carries loss (``weight`` absent or 1). Tool calls come back as
    ``{"id", "type": "function", "function": {"name", "arguments": {...}}}`` (the Hugging Face
    chat-template shape); a ``tool`` message keeps its ``tool_call_id`` and ``name``."""
    import json

    msgs, trainable = [], []
    for m in row["messages"]:
        d = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            d["tool_calls"] = json.loads(m["tool_calls"])
        for k in ("tool_call_id", "name"):
            if m.get(k):
                d[k] = m[k]
        msgs.append(d)
        trainable.append(m["role"] == "assistant" and m.get("weight") != 0)
    tools = json.loads(row["tools"]) if row.get("tools") else None
    return msgs, tools, trainable
