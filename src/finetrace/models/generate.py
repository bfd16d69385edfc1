"""Chat generation with a recorded base model (and, optionally, a PEFT adapter), streamed piece by piece.

    for piece in generate(ws, "smollm2-135m-instruct", "What is the capital of France?"):
        print(piece, end="", flush=True)

The prompt is wrapped in the tokenizer's chat template (system message optional), decoding is greedy
by default and stops at the end-of-turn token. ``model.generate`` runs in a worker thread feeding a
``TextIteratorStreamer``; closing the iterator early stops the worker at the next token.

The pieces are split in two so later stages can reuse them without going through the ledger:
``load_for_chat`` (model + tokenizer, adapter applied) and ``stream_chat`` (the generation loop).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

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
        raise InputError("the adapter has no adapter_model.safetensors; finetrace loads safetensors only",
                         file=str(adapter))
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


def stream_chat(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 256,
                temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                stats: ChatStats | None = None) -> Iterator[str]:
    """Yield the model's reply to ``messages`` as text pieces, as they are generated.

    Greedy when ``temperature`` is 0; otherwise sampling with ``temperature``/``top_p`` (seeded by ``seed``).
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}", field="max_new_tokens")
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the model's tokenizer has no chat template", hint="add a model with one")
    stats = stats if stats is not None else ChatStats()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    stats.prompt_tokens = int(enc["input_ids"].shape[1])

    stop = threading.Event()

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return stop.is_set()

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    eos = tokenizer.eos_token_id
    kwargs = dict(**enc, max_new_tokens=max_new_tokens, streamer=streamer, eos_token_id=eos,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
                  stopping_criteria=StoppingCriteriaList([_Stop()]))
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    result: dict = {}

    def work() -> None:
        try:
            if seed is not None:
                torch.manual_seed(seed)
            with torch.inference_mode():
                result["ids"] = model.generate(**kwargs)
        except BaseException as exc:  # handed to the consumer below
            result["error"] = exc
            streamer.end()

    worker = threading.Thread(target=work, name="finetrace-generate", daemon=True)
    worker.start()
    try:
        for piece in streamer:
            if piece:
                yield piece
    finally:
        stop.set()
        worker.join()
    if "error" in result:
        raise result["error"]
    new = result["ids"][0, stats.prompt_tokens:].tolist()
    stats.token_ids = new
    stats.new_tokens = len(new)
    stats.finish_reason = "stop" if (eos is not None and new and new[-1] == eos) else "length"


def generate(ws: Workspace, model_ref: str, prompt: str, *, max_new_tokens: int = 256,
             system: str | None = None, adapter: str | Path | None = None, temperature: float = 0.0,
             seed: int | None = None, stats: ChatStats | None = None) -> Iterator[str]:
    """Load ``model_ref`` (+ ``adapter``) from the workspace and stream its reply to ``prompt``."""
    model, tok, _ = load_for_chat(ws, model_ref, adapter)
    yield from stream_chat(model, tok, chat_messages(prompt, system), max_new_tokens=max_new_tokens,
                           temperature=temperature, seed=seed, stats=stats)
