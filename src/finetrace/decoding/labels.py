"""Label scoring: the log-probability of each label as the whole answer, for many prompts at once.

For prompt x and label y with tokens y_1..y_m followed by the end-of-turn token e (``chat.turn_end_id``),

    score(y | x) = sum_t log p(y_t | x, y_<t) + log p(e | x, y)

(summed, not length-normalised; the end token makes "bill" and "billing" distinguishable). The
prediction is the argmax label; ties go to the first label. Prompts are sorted by length and scored in
batches that may mix adapters (each row names its own, as in serving); each prompt is run once and its
KV cache is shared by all its labels (pass 1: B prompts; pass 2: B*K continuations on the repeated cache).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from .batch import BASE
from .chat import pad_id, turn_end_id


def label_continuations(tok, labels: Sequence[str], model=None) -> list[list[int]]:
    end = turn_end_id(tok, model)
    return [tok(lab, add_special_tokens=False)["input_ids"] + [end] for lab in labels]


def _left_pad(rows: list[list[int]], pad: int):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _cache_kw(model) -> str:
    fwd = model.get_base_model().forward if hasattr(model, "get_base_model") else type(model).forward
    return "cache" if "cache" in inspect.signature(fwd).parameters else "past_key_values"


def _score_batch(model, adapters, prompt_rows, names, conts, pad) -> torch.Tensor:
    """(B, K) summed log p of every continuation after every prompt."""
    B, K = len(prompt_rows), len(conts)
    ids, mask, pos = _left_pad(prompt_rows, pad)                                   # (B, P)
    kw = adapters.select(names) if adapters is not None else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **kw)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)                   # (B, V)
    cache = out.past_key_values
    cache.batch_repeat_interleave(K)                                               # rows b0k0, b0k1, ...
    L = max(len(c) for c in conts)
    cids = torch.full((K, L), pad, dtype=torch.long)
    cmask = torch.zeros((K, L), dtype=torch.long)
    for k, c in enumerate(conts):
        cids[k, :len(c)] = torch.tensor(c, dtype=torch.long)
        cmask[k, :len(c)] = 1
    full_mask = torch.cat([mask.repeat_interleave(K, 0), cmask.repeat(B, 1)], dim=1)   # (B*K, P+L)
    cpos = mask.sum(1).repeat_interleave(K)[:, None] + torch.arange(L)[None, :]        # (B*K, L)
    kw = adapters.select([n for n in names for _ in range(K)]) if adapters is not None else {}
    kw[_cache_kw(model)] = cache
    logits = model(input_ids=cids.repeat(B, 1), attention_mask=full_mask, position_ids=cpos, use_cache=True,
                   **kw).logits                                                      # (B*K, L, V)
    lp = torch.log_softmax(logits.float(), dim=-1)
    tgt = cids.repeat(B, 1)                                                          # (B*K, L)
    nxt = torch.cat([tgt[:, 1:], torch.full((B * K, 1), pad, dtype=torch.long)], dim=1)
    step = lp.gather(-1, nxt[:, :, None]).squeeze(-1)                               # log p(c_{j+1} | c_<=j)
    valid = torch.cat([cmask[:, 1:], torch.zeros((K, 1), dtype=torch.long)], dim=1).repeat(B, 1).bool()
    rest = (step * valid).sum(-1).view(B, K)
    return first.gather(-1, cids[:, 0].repeat(B, 1)) + rest


def score_prompts(model, tok, prompt_rows: Sequence[list[int]], labels: Sequence[str], adapters=None,
                  names: Sequence[str] | None = None, batch_size: int = 16, on_batch=None) -> list[list[float]]:
    """Summed label log-probabilities for each prompt (token ids), each on its own adapter ``names[i]``."""
    if not labels:
        raise ValueError("label scoring needs at least one label")
    conts = label_continuations(tok, labels, model)
    names = list(names) if names is not None else [BASE] * len(prompt_rows)
    order = sorted(range(len(prompt_rows)), key=lambda i: (-len(prompt_rows[i]), i))
    scores: list = [None] * len(prompt_rows)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            out = _score_batch(model, adapters, [prompt_rows[i] for i in chunk], [names[i] for i in chunk],
                               conts, pad_id(tok))
            for i, row in zip(chunk, out.tolist()):
                scores[i] = row
            if on_batch is not None:
                on_batch(len(chunk))
    return scores


def best_label(labels: Sequence[str], scores: Sequence[float]) -> str:
    return labels[max(range(len(labels)), key=lambda j: (scores[j], -j))]
