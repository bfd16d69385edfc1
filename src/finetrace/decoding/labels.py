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
copies of the cache and no padding between labels. Every forward is the decoder's
(``batch.Decoder.forward``: the lean forward on the packed fp16 weights where it covers the model, the
model's own forward elsewhere), so labels are scored with the kernels and numbers that generate and serve.

When only the best label matters (evaluation's predictions, the server's label constraint without
logprobs: ``best_only``), pass 2 is cut short, exactly: every log p is <= 0, so a label's score is at most
log p(y_1 | x), which pass 1 already gives for every label. Pass 2 first scores each row's label with the
highest first-token log p; a second pass scores only the labels whose first token alone could still beat
it (or tie it from an earlier place). The argmax is the one of the full scores; a tuned classifier
usually needs one label per row instead of all K.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .batch import BASE, Decoder
from .chat import turn_end_id
from .kvcache import repeat_rows, slab_cache
from .prefix import MIN_TOKENS


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


MIN_SHARED = MIN_TOKENS  # a shorter common prefix is not worth its own forward (the prefix cache's rule)


def _shared_prefix(rows: list[list[int]]) -> int:
    """How many leading tokens every row has in common (leaving each row at least one of its own)."""
    first, n = rows[0], min(len(r) for r in rows) - 1
    for j in range(n):
        t = first[j]
        if any(r[j] != t for r in rows):
            return j
    return max(n, 0)


def _prompt_pass(dec: Decoder, prompt_rows, names):
    """Run the prompts into a fresh cache; returns (logits of each prompt's last position (B, V), the cache,
    the mask over it (B, P)). What the decoder's prefix cache (``prefix.py``) holds of them is not read
    again; else the tokens every prompt starts with are read once per adapter. Every prompt read is kept
    in the prefix cache, for the next batch (the same system turn, a bias variant of an earlier prompt)."""
    cache, prefixes = slab_cache(dec.n_layers), dec.prefix_cache()
    ids, mask, pos = _left_pad(prompt_rows, dec.pad)  # (B, P)
    pre = prefixes.seed(cache.layers, names, prompt_rows)
    c = 0 if pre or len(prompt_rows) == 1 else _shared_prefix(prompt_rows)
    cols = None  # each prompt in its last columns
    if pre or c < MIN_SHARED:
        logits = dec.forward(ids[:, pre:], mask, pos[:, pre:], cache, names)
    else:  # the common beginning once per adapter, repeated into the rows, then the rest left-padded
        uniq = list(dict.fromkeys(names))
        head = torch.tensor([prompt_rows[0][:c]] * len(uniq), dtype=torch.long)
        dec.forward(head, torch.ones_like(head), torch.arange(c).expand(len(uniq), c), cache, uniq)
        repeat_rows(cache, [uniq.index(n) for n in names])
        rest = [r[c:] for r in prompt_rows]
        ids, mask, pos = _left_pad(rest, dec.pad)  # (B, P - c)
        mask = torch.cat([torch.ones((len(rest), c), dtype=torch.long), mask], dim=1)  # (B, P)
        logits = dec.forward(ids, mask, pos + c, cache, names)
        width = mask.shape[1]
        cols = [torch.cat([torch.arange(c), torch.arange(width - len(r), width)]) for r in rest]
    prefixes.keep(cache.layers, names, prompt_rows, cols)
    return logits, cache, mask


def _label_pass(dec: Decoder, cache, mask, names, conts, picks) -> dict[tuple[int, int], torch.Tensor]:
    """Pass 2 for the labels ``picks[b]`` of each row ``b``: log p of every label token after the first (its
    c_1..c_{m-1} side by side in one row after the prompt, a 4D mask letting each label see the prompt and
    itself only; rows with fewer label tokens padded with tokens that see the prompt and are not scored).
    Returns {(row, label): summed log p}; the prompt cache is left as it was."""
    B, P = mask.shape
    seg, off, ids, nxt = [], [], [], []  # per row: label of each token, its place in the label, it, its next
    for ks in picks:
        ins = [(k, j) for k in ks for j in range(len(conts[k]) - 1)]
        seg.append([k for k, _ in ins])
        off.append([j for _, j in ins])
        ids.append([conts[k][j] for k, j in ins])
        nxt.append([conts[k][j + 1] for k, j in ins])
    T = max(len(r) for r in seg)
    if T == 0:  # every picked label is the end token alone: nothing after the first
        return {(b, k): torch.zeros(()) for b, ks in enumerate(picks) for k in ks}
    pad = [T - len(r) for r in seg]
    segs = torch.tensor([r + [-1] * n for r, n in zip(seg, pad)], dtype=torch.long)  # (B, T); -1: padding
    offs = torch.tensor([r + [0] * n for r, n in zip(off, pad)], dtype=torch.long)
    see = (segs[:, :, None] == segs[:, None, :]) & (offs[:, None, :] <= offs[:, :, None]) & (segs[:, None, :] >= 0)
    keep = torch.cat([mask.bool()[:, None, :].expand(B, T, P), see], dim=-1)[:, None]  # (B, 1, T, P + T)
    cids = torch.tensor([r + [0] * n for r, n in zip(ids, pad)], dtype=torch.long)
    cols = torch.ones((B, T), dtype=torch.long)
    logits = dec.forward(cids, torch.cat([mask, cols], 1), mask.sum(1)[:, None] + offs, cache, names, keep)
    cache.crop(-T)  # drop the label tokens: the next pass starts from the prompt again
    targets = torch.tensor([r + [0] * n for r, n in zip(nxt, pad)], dtype=torch.long)
    step = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, :, None]).squeeze(-1)  # (B, T)
    col = torch.where(segs >= 0, segs, len(conts))  # padding sums into a column of its own
    rest = torch.zeros((B, len(conts) + 1), dtype=step.dtype).scatter_add_(1, col, step)
    return {(b, k): rest[b, k] for b, ks in enumerate(picks) for k in ks}


def _score_batch(dec: Decoder, prompt_rows, names, conts, best_only: bool = False) -> list[list[float | None]]:
    """Every continuation's summed log p after every prompt, (B, K) as lists. ``best_only``: only as many
    labels as it takes to know each row's best one exactly; the others are None (see ``best_label``)."""
    B, K = len(prompt_rows), len(conts)
    last, cache, mask = _prompt_pass(dec, prompt_rows, names)
    first = torch.log_softmax(last.float(), dim=-1)
    bound = first[:, torch.tensor([c[0] for c in conts], dtype=torch.long)]  # (B, K): log p(c_1) >= score
    scores: list[list] = [[None] * K for _ in range(B)]

    def run(picks):
        for (b, k), rest in _label_pass(dec, cache, mask, names, conts, picks).items():
            scores[b][k] = float(bound[b, k] + rest)

    if not best_only:
        run([list(range(K))] * B)
        return scores
    # a label's score is its first token's log p plus log ps <= 0: score it first, then only the labels whose
    # first token alone could still beat (or tie, ahead of it) the best score so far
    top = bound.argmax(-1).tolist()  # the first maximal bound: ties go to the first label
    run([[k] for k in top])
    later = []
    for b in range(B):
        s, j = scores[b][top[b]], top[b]
        later.append(
            [k for k in range(K) if k != j and (float(bound[b, k]) > s or (float(bound[b, k]) == s and k < j))]
        )
    if any(later):
        run(later)
    return scores


def score_prompts(
    model,
    tok,
    prompt_rows: Sequence[list[int]],
    labels: Sequence[str],
    adapters=None,
    names: Sequence[str] | None = None,
    batch_size: int = 16,
    on_batch=None,
    best_only: bool = False,
    decoder: Decoder | None = None,
) -> list[list[float | None]]:
    """Summed label log-probabilities for each prompt (token ids), each on its own adapter ``names[i]``.
    ``best_only``: score only the labels needed to know each prompt's best one (``best_label`` of the
    result is exactly that of the full scores); the others are None. ``decoder``: a ``Decoder`` already
    made for this model and these adapters (the server's), whose forward is reused."""
    if not labels:
        raise ValueError("label scoring needs at least one label")
    # the decoder's forward and weights: one set of kernels and numbers
    dec = decoder if decoder is not None else Decoder(model, tok, adapters)
    conts = label_continuations(tok, labels, model)
    names = list(names) if names is not None else [BASE] * len(prompt_rows)
    order = sorted(range(len(prompt_rows)), key=lambda i: (-len(prompt_rows[i]), i))
    scores: list = [None] * len(prompt_rows)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            out = _score_batch(dec, [prompt_rows[i] for i in chunk], [names[i] for i in chunk], conts, best_only)
            for i, row in zip(chunk, out):
                scores[i] = row
            if on_batch is not None:
                on_batch(len(chunk))
    return scores


def best_label(labels: Sequence[str], scores: Sequence[float | None]) -> str:
    """The highest-scoring label (ties: the first); None scores (``best_only``) were not needed to know it."""
    return labels[max((j for j, s in enumerate(scores) if s is not None), key=lambda j: (scores[j], -j))]
