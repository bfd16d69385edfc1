"""Chat-template rendering and where an answer ends, both read from the model itself (never hard-coded).

    text = render(tok, [{"role": "user", "content": "Hi"}])       # the exact text the model sees
    ids = encode_chat(tok, messages)                               # its token ids (no extra BOS)
    end_ids(tok, model)  -> frozenset of ids that end an answer
    turn_end_id(tok, model) -> the one id the chat template closes an assistant turn with

The end of an answer is the union of the generation config's ``eos_token_id`` (int or list), the
tokenizer's eos, and the end-of-turn token of the chat template, found by rendering an assistant turn
around a marker and reading the first special token that follows it. So a ChatML model stops at
``<|im_end|>``, a Llama-3 model at ``<|eot_id|>``, and a model with its own template at its own token.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InputError

_MARK = "\u2063finetrace-marker\u2063"


def _as_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def render(tok, prompt, tools: Sequence[dict] | None = None) -> str:
    """``prompt`` (messages, or a user string) rendered by the tokenizer's chat template, assistant turn open."""
    if not getattr(tok, "chat_template", None):
        raise InputError("the model's tokenizer has no chat template", hint="add a model with one")
    from jinja2 import TemplateError

    messages = _as_messages(prompt)
    try:
        text = tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **({"tools": list(tools)} if tools else {})
        )
    except (TemplateError, TypeError, KeyError, ValueError) as exc:  # raise_exception() in the template, ...
        raise InputError(
            f"the model's chat template cannot render these messages: {exc}",
            field="messages",
            hint="send the roles and fields this model's template expects",
        ) from None
    if tools and text == render(tok, messages):
        raise InputError(
            "the model's chat template does not render tools (the prompt is the same without them)",
            hint="serve a model whose chat template takes `tools` (Hermes, Qwen, Llama 3.1 style), "
            "or describe the functions in a system message",
            field="tools",
        )
    return text


def encode_chat(tok, prompt, tools: Sequence[dict] | None = None) -> list[int]:
    """Token ids of ``render(tok, prompt)``; the template supplies any BOS itself."""
    return tok(render(tok, prompt, tools), add_special_tokens=False)["input_ids"]


def encode_text(tok, text: str) -> list[int]:
    """A raw completion prompt (no template), with the tokenizer's own special tokens."""
    return tok(text)["input_ids"]


def _ids(value) -> set[int]:
    if isinstance(value, int):
        return {value}
    return {int(v) for v in (value or []) if v is not None}


def template_turn_end(tok) -> int | None:
    """The special token the chat template writes right after an assistant message, if any."""
    if not getattr(tok, "chat_template", None):
        return None
    cache = getattr(tok, "_ft_turn_end", "unset")
    if cache != "unset":
        return cache
    found = None
    try:
        text = tok.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARK}], tokenize=False
        )
        tail = text[text.index(_MARK) + len(_MARK) :]
        special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
        for t in tok(tail, add_special_tokens=False)["input_ids"]:
            if t in special:
                found = int(t)
                break
            if tok.decode([t]).strip():
                break  # visible text before any special token: the template has no end-of-turn token
    except Exception:  # a template that needs other fields: fall back to eos only
        found = None
    try:
        tok._ft_turn_end = found
    except Exception:
        pass
    return found


def end_ids(tok, model=None) -> frozenset[int]:
    """Every token id that ends an answer: generation config eos, tokenizer eos, template end of turn."""
    gen = getattr(model, "generation_config", None) if model is not None else None
    out = _ids(getattr(gen, "eos_token_id", None)) | _ids(tok.eos_token_id)
    turn = template_turn_end(tok)
    if turn is not None:
        out.add(turn)
    return frozenset(out)


def turn_end_id(tok, model=None) -> int:
    """The token that closes an assistant turn (label scoring appends it to each label)."""
    turn = template_turn_end(tok)
    if turn is not None:
        return turn
    ids = sorted(end_ids(tok, model))
    if not ids:
        raise InputError("the model has no end-of-turn or eos token", hint="set eos_token_id in its generation config")
    return tok.eos_token_id if tok.eos_token_id in ids else ids[0]


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
