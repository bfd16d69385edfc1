"""Rendering a conversation with the model's own chat template, and locating its assistant turns.

A conversation is rendered once, as the template renders it for inference; an assistant turn ``i``
that carries loss is located as the text between ``render(messages[:i], generation prompt)`` and
``render(messages[:i+1])``, cut after the end-of-turn token (so the loss covers the turn's content,
its tool calls as the template writes them, and its end-of-turn token, never the next turn's header).
Tokens whose character span lies inside a located turn carry loss. A template for which a turn's text
changes once later turns follow cannot be masked this way and is refused, as is a template that
drops tool calls or the tool list (it would train on conversations with the calls silently removed).
"""

from __future__ import annotations

from ..errors import InputError

_PROBE_TOOL = {
    "type": "function",
    "function": {"name": "ft_probe_tool", "description": "probe", "parameters": {"type": "object", "properties": {}}},
}
_PROBE = [
    {"role": "user", "content": "probe"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": "ft_probe_call", "arguments": {"x": 1}}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_0", "content": "ft_probe_result"},
]


def check_renders_tools(tokenizer) -> None:
    """Raise InputError unless the chat template writes the tool list, a tool call and a tool result."""
    try:
        text = tokenizer.apply_chat_template(_PROBE, tools=[_PROBE_TOOL], tokenize=False)
    except Exception as exc:  # a template that raises on tool messages
        raise InputError(
            f"the model's chat template cannot render tool calls: {exc}",
            hint="train tool-calling data on a base model whose chat template supports tools",
        ) from None
    missing = [
        w
        for w, probe in (
            ("the tool list", "ft_probe_tool"),
            ("tool calls", "ft_probe_call"),
            ("tool results", "ft_probe_result"),
        )
        if probe not in text
    ]
    if missing:
        raise InputError(
            f"the model's chat template does not render {', '.join(missing)}: the conversations "
            "would be trained with them silently dropped",
            hint="use a base model whose chat template supports tools (its tokenizer_config.json "
            "chat_template mentions tools and tool_calls), or import the data without tools",
        )


def _render(tokenizer, messages, tools, generation: bool = False) -> str:
    if not messages:
        return ""
    kw = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **kw)


def turn_spans(tokenizer, messages: list[dict], tools, trainable: list[bool]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, [(start, end) character span of each turn that carries loss])."""
    full = _render(tokenizer, messages, tools)
    eos = tokenizer.eos_token
    spans = []
    for i, train in enumerate(trainable):
        if not train:
            continue
        before = _render(tokenizer, messages[:i], tools, generation=True)
        upto = _render(tokenizer, messages[: i + 1], tools)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise InputError(
                f"the chat template renders turn {i} differently once later turns follow, so "
                "its tokens cannot be located for the loss",
                hint="set loss_turns: last in the train config (loss on the final turn only)",
            )
        end = upto.find(eos, len(before)) if eos else -1
        spans.append((len(before), end + len(eos) if end >= 0 else len(upto.rstrip())))
    return full, spans
