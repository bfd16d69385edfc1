"""Evaluation's model calls, all through the one decoder (``finetrace.decoding``) that serving uses.

    generate(model, tok, prompts, max_new_tokens=64, stop=("\\n\\n",), batch_size=8) -> list[str]
    generate_seqs(...) -> list[decoding.Seq]          # the same, with token ids (recorded for parity)
    score_labels(model, tok, prompts, labels, batch_size=8) -> (best labels, [[logprob per label]])
    text_nll(model, tok, texts, batch_size=8) -> (sum of token NLLs, number of scored tokens)

Prompts are chat messages rendered with the tokenizer's chat template (``decoding.render``), the same
rendering training and serving use. Generation is greedy through ``decoding.Decoder`` (continuous
batching over a preallocated KV cache, the serving engine's forward): a row stops at the model's own
end-of-turn ids (``decoding.end_ids``: generation config, eos, chat template), at any stop string (cut
from the answer) or after ``max_new_tokens``; the answer is ``decoding.normalise_answer`` of the text.
``adapters``/``adapter`` pick the LoRA slot every row runs on (``decoding.lora``), exactly as served.
Label scoring is ``decoding.labels`` (see there for the formula).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..decoding import BASE, Decoder, Seq, encode_chat, render, score_prompts
from ..decoding.chat import pad_id
from ..decoding.labels import best_label
from ..decoding.text import cut_at_stop  # noqa: F401  (re-exported for callers)
from ..progress import Counter, Progress

Prompt = Sequence[dict] | str

__all__ = ["generate", "generate_seqs", "render", "score_labels", "text_nll"]


def _encode(tok, texts: list[str]) -> list[list[int]]:
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _left_pad(rows: list[list[int]], pad: int):
    """(input_ids, attention_mask, position_ids), each (B, T), rows aligned to the right edge."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


# duplicates: alike generate on purpose (generate() is generate_seqs() reduced to the answers; the public signature is spelled out in both).
def generate_seqs(
    model,
    tok,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 64,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    progress: Progress | None = None,
    description: str = "generate",
    adapters=None,
    adapter: str = BASE,
    decoder: Decoder | None = None,
) -> list[Seq]:
    """Greedy generations for ``prompts`` (in input order) through the serving decoder (``decoder``: one
    made already for this model and these adapters, whose prefix cache carries over between calls)."""
    seqs = [Seq(encode_chat(tok, p), adapter, max_new_tokens, stop=list(stop)) for p in prompts]
    dec = decoder if decoder is not None else Decoder(model, tok, adapters, max_batch=batch_size)
    with Counter(progress, description, len(seqs)) as bar:
        dec.run(seqs, on_done=bar.advance)
    return seqs


# duplicates: alike generate_seqs on purpose (generate() is generate_seqs() reduced to the answers; the public signature is spelled out in both).
def generate(
    model,
    tok,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 64,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    progress: Progress | None = None,
    description: str = "generate",
    adapters=None,
    adapter: str = BASE,
) -> list[str]:
    """Greedy answers for ``prompts`` (normalised), in input order."""
    return [
        s.answer
        for s in generate_seqs(
            model, tok, prompts, max_new_tokens, stop, batch_size, progress, description, adapters, adapter
        )
    ]


def score_labels(
    model,
    tok,
    prompts: Sequence[Prompt],
    labels: Sequence[str],
    batch_size: int = 8,
    progress: Progress | None = None,
    description: str = "score labels",
    adapters=None,
    adapter: str | Sequence[str] = BASE,
    best_only: bool = False,
    decoder: Decoder | None = None,
) -> tuple[list[str], list[list[float | None]]]:
    """Constrained classification: each prompt's label with the highest summed log-probability.
    ``adapter``: one adapter name for all prompts, or one per prompt (a batch may mix them); ``best_only``:
    score only the labels needed to know the best one (``decoding.labels``), the others are None."""
    if not labels:
        raise ValueError("score_labels needs at least one label")
    rows = [encode_chat(tok, p) for p in prompts]
    names = [adapter] * len(rows) if isinstance(adapter, str) else list(adapter)
    with Counter(progress, description, len(rows)) as bar:
        scores = score_prompts(model, tok, rows, labels, adapters, names, batch_size, bar.advance, best_only, decoder)
    return [best_label(labels, s) for s in scores], scores


def text_nll(
    model, tok, texts: Sequence[str], batch_size: int = 8, decoder: Decoder | None = None, adapter: str = BASE
) -> tuple[float, int]:
    """Summed next-token NLL over ``texts`` (plain text, no template) and the number of scored tokens,
    through the decoder's forward (``decoder``, or one made for ``model``) with every row on ``adapter``:
    the kernels and weights that score labels, generate and serve. Each text's tokens see only their own
    earlier tokens (an explicit causal mask; a left-padding token sees itself only and is not scored)."""
    import torch

    from ..decoding.kvcache import slab_cache

    dec = decoder if decoder is not None else Decoder(model, tok)
    # longest first, so that each batch's rows are of about one length (left padding is computed too)
    rows = sorted((r for r in _encode(tok, list(texts)) if len(r) >= 2), key=len, reverse=True)
    total, count = 0.0, 0
    with torch.inference_mode():
        for s in range(0, len(rows), batch_size):
            chunk = rows[s : s + batch_size]
            ids, mask, pos = _left_pad(chunk, pad_id(tok))
            B, T = ids.shape
            seen = mask.bool()[:, None, :] & torch.ones((T, T), dtype=torch.bool).tril()[None]  # (B, T, T)
            keep = (seen | torch.eye(T, dtype=torch.bool)[None])[:, None]  # (B, 1, T, T)
            logits = dec.forward(ids, mask, pos, slab_cache(dec.n_layers), [adapter] * B, keep)  # (B, T, V)
            valid = mask[:, 1:].bool() & mask[:, :-1].bool()
            for b in range(B):  # a row at a time: (T, V) log-probs, not (B, T, V)
                lp = torch.log_softmax(logits[b, :-1].float(), dim=-1).gather(-1, ids[b, 1:, None]).squeeze(-1)
                total += float(-(lp * valid[b]).sum())
            count += int(valid.sum())
    return total, count
