"""Label scoring: the log-probability of each label as the whole answer, for many prompts at once.

For prompt x and label y with tokens y_1..y_m followed by the end-of-turn token e (``chat.turn_end_id``),

    score(y | x) = sum_t log p(y_t | x, y_<t) + log p(e | x, y)

(summed, not length-normalised; the end token makes "bill" and "billing" distinguishable). The
prediction is the argmax label; ties go to the first label. Prompts are sorted by length and scored in
batches that may mix adapters (each row names its own, as in serving). Pass 0: the tokens every prompt
of the batch starts with (the chat template's system turn) run once per adapter, their cache shared by
the rows. Pass 1: the rest of each prompt. Pass 2: every label's tokens but the last (the end token
predicts nothing that is scored), all labels side by side in one row per prompt on that prompt's cache,
a 4D attention mask letting each label see the prompt and itself only: B rows of sum(|y|) tokens, no
copies of the cache and no padding between labels.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from .batch import BASE
from .chat import pad_id, turn_end_id
from .packed import decode_weights, round_to_fp16


def label_continuations(tok, labels: Sequence[str], model=None) -> list[list[int]]:
    end = turn_end_id(tok, model)
    return [tok(lab, add_special_tokens=False)["input_ids"] + [end] for lab in labels]


def _left_pad(rows: list[list[int]], pad: int):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _cache_kw(model) -> str:
    fwd = model.get_base_model().forward if hasattr(model, "get_base_model") else type(model).forward
    return "cache" if "cache" in inspect.signature(fwd).parameters else "past_key_values"


MIN_SHARED = 8  # a shorter common prefix is not worth its own forward


def _shared_prefix(rows: list[list[int]]) -> int:
    """How many leading tokens every row has in common (leaving each row at least one of its own)."""
    first, n = rows[0], min(len(r) for r in rows) - 1
    for j in range(n):
        t = first[j]
        if any(r[j] != t for r in rows):
            return j
    return max(n, 0)


def _prompt_pass(model, adapters, prompt_rows, names, pad):
    """Run the prompts (their shared prefix once per adapter); returns (output, mask over the cache)."""
    c, cache = (_shared_prefix(prompt_rows) if len(prompt_rows) > 1 else 0), None
    if c >= MIN_SHARED:
        uniq = list(dict.fromkeys(names))
        kw = adapters.select(uniq) if adapters is not None else {}
        pre = model(
            input_ids=torch.tensor([prompt_rows[0][:c]] * len(uniq), dtype=torch.long),
            use_cache=True,
            logits_to_keep=1,
            **kw,
        )
        cache = pre.past_key_values
        cache.batch_select_indices(torch.tensor([uniq.index(n) for n in names], dtype=torch.long))
        prompt_rows = [r[c:] for r in prompt_rows]
    else:
        c = 0
    ids, mask, pos = _left_pad(prompt_rows, pad)  # (B, P - c)
    kw = adapters.select(names) if adapters is not None else {}
    if cache is not None:
        kw[_cache_kw(model)] = cache
        mask = torch.cat([torch.ones((len(prompt_rows), c), dtype=torch.long), mask], dim=1)  # (B, P)
        pos = pos + c
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **kw)
    return out, mask


def _score_batch(model, adapters, prompt_rows, names, conts, pad) -> torch.Tensor:
    """(B, K) summed log p of every continuation after every prompt."""
    B, K = len(prompt_rows), len(conts)
    out, mask = _prompt_pass(model, adapters, prompt_rows, names, pad)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V)
    # pass 2: every label's c_1..c_{m-1} (the end token predicts nothing scored) in ONE row per prompt,
    # side by side after it: a 4D mask lets each label's tokens see the prompt and their own label only
    ins = [c[:-1] for c in conts]
    seg = torch.tensor([k for k, c in enumerate(ins) for _ in c], dtype=torch.long)  # (T,) label of token
    off = torch.tensor([j for c in ins for j in range(len(c))], dtype=torch.long)  # (T,) place in label
    heads = torch.tensor([c[0] for c in conts], dtype=torch.long)  # (K,)
    T = len(seg)
    if T == 0:
        return first[:, heads]
    cids = torch.tensor([t for c in ins for t in c], dtype=torch.long)  # (T,)
    nxt = torch.tensor([t for c in conts for t in c[1:]], dtype=torch.long)  # (T,) c_{j+1}
    see = (seg[:, None] == seg[None, :]) & (off[None, :] <= off[:, None])  # (T, T)
    allow = torch.cat([mask.bool()[:, None, :].expand(B, T, -1), see.expand(B, T, T)], dim=-1)  # (B, T, P+T)
    dtype = next(model.parameters()).dtype
    attn = torch.zeros(allow.shape, dtype=dtype).masked_fill(~allow, torch.finfo(dtype).min)[:, None]
    cpos = mask.sum(1)[:, None] + off[None, :]  # (B, T)
    kw = adapters.select(names) if adapters is not None else {}
    kw[_cache_kw(model)] = out.past_key_values
    logits = model(
        input_ids=cids.expand(B, T), attention_mask=attn, position_ids=cpos, use_cache=True, **kw
    ).logits  # (B, T, V)
    step = torch.log_softmax(logits.float(), dim=-1).gather(-1, nxt.expand(B, T)[:, :, None]).squeeze(-1)
    rest = torch.zeros((B, K), dtype=step.dtype).index_add_(1, seg, step)  # (B, K)
    return first[:, heads] + rest


def score_prompts(
    model,
    tok,
    prompt_rows: Sequence[list[int]],
    labels: Sequence[str],
    adapters=None,
    names: Sequence[str] | None = None,
    batch_size: int = 16,
    on_batch=None,
) -> list[list[float]]:
    """Summed label log-probabilities for each prompt (token ids), each on its own adapter ``names[i]``."""
    if not labels:
        raise ValueError("label scoring needs at least one label")
    if decode_weights(model) == "fp16":  # the weights generation decodes on (packed.py): one set of numbers
        round_to_fp16(model)
    conts = label_continuations(tok, labels, model)
    names = list(names) if names is not None else [BASE] * len(prompt_rows)
    order = sorted(range(len(prompt_rows)), key=lambda i: (-len(prompt_rows[i]), i))
    scores: list = [None] * len(prompt_rows)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            out = _score_batch(
                model, adapters, [prompt_rows[i] for i in chunk], [names[i] for i in chunk], conts, pad_id(tok)
            )
            for i, row in zip(chunk, out.tolist()):
                scores[i] = row
            if on_batch is not None:
                on_batch(len(chunk))
    return scores


def best_label(labels: Sequence[str], scores: Sequence[float]) -> str:
    return labels[max(range(len(labels)), key=lambda j: (scores[j], -j))]
