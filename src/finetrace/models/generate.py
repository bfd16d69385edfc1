"""Chat generation with a recorded base model (and, optionally, a PEFT adapter), streamed piece by piece.

    for piece in generate(ws, "smollm2-135m-instruct", "What is the capital of France?"):
        print(piece, end="", flush=True)

The prompt is wrapped in the tokenizer's chat template (system message optional); decoding is the one
decoder (``finetrace.decoding``) that evaluation and serving use, greedy by default, ending at the
model's own end-of-turn ids; pieces are yielded as they are decoded (closing the iterator stops it).

The pieces are split in two so later stages can reuse them without going through the ledger:
``load_for_chat`` (model + tokenizer, adapter applied) and ``stream_chat`` (the generation loop).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, NotFoundError
from ..workspace import Workspace


@dataclass
class ChatStats:
    """Filled in while a ``stream_chat`` runs: prompt and generated token counts, and why it stopped."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    finish_reason: str | None = None  # "stop" (end-of-turn token) or "length" (max_new_tokens)
    token_ids: list[int] = field(default_factory=list)


def apply_adapter(model, adapter: str | Path):
    """Wrap ``model`` with the PEFT adapter in folder ``adapter`` (safetensors only; never pickle)."""
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise NotFoundError(f"no PEFT adapter at {adapter} (adapter_config.json missing)")
    if not (adapter / "adapter_model.safetensors").is_file():
        raise InputError(
            "the adapter has no adapter_model.safetensors; finetrace loads safetensors only", file=str(adapter)
        )
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter), is_trainable=False).eval()


def adapter_folder(ws: Workspace, adapter: str | Path) -> Path:
    """A PEFT adapter folder: ``adapter`` itself if it is a folder, else a recorded ``adapter`` artifact
    (name, name@N or digest) materialised from the store (every file re-hashed)."""
    path = Path(adapter).expanduser()
    if path.is_dir():
        return path
    art = ws.ledger.resolve(str(adapter), kind="adapter")
    return ws.store.materialize(art.digest)


def load_for_chat(ws: Workspace, model_ref: str, adapter: str | Path | None = None):
    """``(model, tokenizer, artifact)`` for base model ``model_ref``, with ``adapter`` applied if given."""
    from . import load_model

    model, tok, art = load_model(ws, model_ref)
    if adapter is not None:
        model = apply_adapter(model, adapter_folder(ws, adapter))
    return model, tok, art


def chat_messages(prompt: str, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}]


def stream_chat(
    model,
    tokenizer,
    messages: list[dict],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stats: ChatStats | None = None,
) -> Iterator[str]:
    """Yield the model's reply to ``messages`` as text pieces, as they are decoded.

    Greedy when ``temperature`` is 0; otherwise sampling with ``temperature``/``top_p`` (seeded by ``seed``).
    Decoding is ``finetrace.decoding.Decoder`` (the serving engine's): the reply ends at the model's own
    end-of-turn ids; the pieces add up to the served text, whose normalised form is the served answer.
    """
    from ..decoding import Decoder, Seq, encode_chat

    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}", field="max_new_tokens")
    stats = stats if stats is not None else ChatStats()
    pieces: list[str] = []
    seq = Seq(
        encode_chat(tokenizer, messages),
        max_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        on_delta=pieces.append,
    )
    stats.prompt_tokens = len(seq.prompt_ids)
    dec = Decoder(model, tokenizer, max_batch=1)
    dec.add(seq)
    try:
        while seq.finish is None:
            dec.step()
            while pieces:
                yield pieces.pop(0)
    finally:
        seq.cancelled = True
    stats.token_ids = list(seq.ids) + ([seq.end_token] if seq.end_token is not None else [])
    stats.new_tokens = len(stats.token_ids)
    stats.finish_reason = seq.finish


# duplicates: alike cli/models.py:generate on purpose (the CLI loads and streams itself to time the load and the reply apart).
def generate(
    ws: Workspace,
    model_ref: str,
    prompt: str,
    *,
    max_new_tokens: int = 256,
    system: str | None = None,
    adapter: str | Path | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    stats: ChatStats | None = None,
) -> Iterator[str]:
    """Load ``model_ref`` (+ ``adapter``) from the workspace and stream its reply to ``prompt``."""
    model, tok, _ = load_for_chat(ws, model_ref, adapter)
    yield from stream_chat(
        model,
        tok,
        chat_messages(prompt, system),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        stats=stats,
    )
