"""Batched, greedy, deterministic model calls: free generation, constrained label scoring, text NLL.

    generate(model, tok, prompts, max_new_tokens=64, stop=("\\n\\n",), batch_size=8) -> list[str]
    score_labels(model, tok, prompts, labels, batch_size=8) -> (best labels, [[logprob per label]])
    text_nll(model, tok, texts, batch_size=8) -> (sum of token NLLs, number of scored tokens)

Prompts are chat messages rendered with the tokenizer's chat template (``add_generation_prompt``), the
same rendering training uses through ``data.schemas.to_example``. Batches are left-padded (so every row's
next token sits in the last column and the KV cache is shared by the batch) after sorting prompts by
length (less padding), and answers are returned in the caller's order. Generation is greedy with the KV
cache; a row stops at the end-of-turn token, at any stop string, or after ``max_new_tokens``, and the
stop string itself is cut from the answer.

Label scoring: for prompt x and label y with tokens y_1..y_m followed by the end-of-turn token e,

    score(y | x) = sum_t log p(y_t | x, y_<t) + log p(e | x, y)

(summed, not length-normalised; the end token makes "bill" and "billing" distinguishable). The
prediction is the argmax label; ties go to the first label in the dataset's order. Each prompt is run
once and its KV cache is shared by all its labels.
"""

from __future__ import annotations

from typing import Sequence

from .progress import ExampleProgress

Prompt = Sequence[dict] | str


def render(tok, prompt: Prompt) -> str:
    """A prompt as the exact text the model sees (chat template with the assistant turn opened)."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    return tok.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


def _encode(tok, texts: list[str]) -> list[list[int]]:
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _left_pad(rows: list[list[int]], pad_id: int):
    """(input_ids, attention_mask, position_ids), each (B, T), rows aligned to the right edge."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def _eos_ids(tok, model) -> list[int]:
    ids = set()
    for src in (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(src)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tok.unk_token_id and im_end is not None:
        ids.add(im_end)
    return sorted(ids)


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _batches(order: list[int], size: int):
    for s in range(0, len(order), size):
        yield order[s:s + size]


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest stop string."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


class _StopStrings:
    """Per-row stopping criterion: a row is done once its decoded answer contains a stop string."""

    def __init__(self, tok, prompt_width: int, stop: Sequence[str]):
        self.tok, self.width, self.stop = tok, prompt_width, [s for s in stop if s]

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        if not self.stop:
            return done
        for i, row in enumerate(input_ids[:, self.width:].tolist()):
            text = self.tok.decode(row, skip_special_tokens=False)
            done[i] = any(s in text for s in self.stop)
        return done


def generation_config(tok, model, max_new_tokens: int):
    from transformers import GenerationConfig

    eos = _eos_ids(tok, model)
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                            eos_token_id=eos, pad_token_id=_pad_id(tok))


def decode_answer(tok, new_ids: list[int], eos: Sequence[int], stop: Sequence[str]) -> str:
    """Decode generated ids: up to the first end token, then cut at the first stop string."""
    for j, t in enumerate(new_ids):
        if t in eos:
            new_ids = new_ids[:j]
            break
    return cut_at_stop(tok.decode(new_ids, skip_special_tokens=True), stop).strip()


def generate(model, tok, prompts: Sequence[Prompt], max_new_tokens: int = 64, stop: Sequence[str] = (),
             batch_size: int = 8, progress: bool = False, description: str = "generate") -> list[str]:
    """Greedy answers for ``prompts``, batched with left padding and the KV cache, in input order."""
    import torch
    from transformers import StoppingCriteriaList

    rows = _encode(tok, [render(tok, p) for p in prompts])
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
    cfg = generation_config(tok, model, max_new_tokens)
    eos = set(cfg.eos_token_id)
    out: list[str | None] = [None] * len(rows)
    with ExampleProgress(len(rows), description, progress) as bar, torch.inference_mode():
        for chunk in _batches(order, batch_size):
            ids, mask, _ = _left_pad([rows[i] for i in chunk], cfg.pad_token_id)
            gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg,
                                 stopping_criteria=StoppingCriteriaList([_StopStrings(tok, ids.shape[1], stop)]))
            for k, i in enumerate(chunk):
                out[i] = decode_answer(tok, gen[k, ids.shape[1]:].tolist(), eos, stop)
            bar.advance(len(chunk))
    return out  # type: ignore[return-value]


def _cache_kwarg(model) -> str:
    """``cache`` in newer transformers, ``past_key_values`` before (deprecated since 5.x)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _label_logprobs(model, prompt_rows: list[list[int]], conts: list[list[int]], pad_id: int) -> list[list[float]]:
    """Summed log p of every continuation after every prompt, sharing each prompt's KV cache.

    Pass 1 runs the B left-padded prompts once (cache kept); the cache is repeated K times and pass 2
    runs the K right-padded continuations for every prompt on top of it: about B*P + B*K*L tokens
    instead of B*K*(P+L).
    """
    import torch

    B, K = len(prompt_rows), len(conts)
    ids, mask, pos = _left_pad(prompt_rows, pad_id)                     # (B, P)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)        # (B, V): predicts each cont's 1st token
    cache = out.past_key_values
    cache.batch_repeat_interleave(K)                                    # rows b0k0, b0k1, ..., b1k0, ...
    L = max(len(c) for c in conts)
    cids = torch.full((K, L), pad_id, dtype=torch.long)
    cmask = torch.zeros((K, L), dtype=torch.long)
    for k, c in enumerate(conts):
        cids[k, :len(c)] = torch.tensor(c, dtype=torch.long)
        cmask[k, :len(c)] = 1
    full_mask = torch.cat([mask.repeat_interleave(K, 0), cmask.repeat(B, 1)], dim=1)   # (B*K, P+L)
    cpos = mask.sum(1).repeat_interleave(K)[:, None] + torch.arange(L)[None, :]        # (B*K, L)
    logits = model(input_ids=cids.repeat(B, 1), attention_mask=full_mask, position_ids=cpos,
                   use_cache=True, **{_cache_kwarg(model): cache}).logits             # (B*K, L, V)
    lp = torch.log_softmax(logits.float(), dim=-1)
    scores = []
    for b in range(B):
        row = []
        for k, c in enumerate(conts):
            r = b * K + k
            total = float(first[b, c[0]])
            for j in range(1, len(c)):
                total += float(lp[r, j - 1, c[j]])
            row.append(total)
        scores.append(row)
    return scores


def score_labels(model, tok, prompts: Sequence[Prompt], labels: Sequence[str], batch_size: int = 8,
                 progress: bool = False, description: str = "score labels") -> tuple[list[str], list[list[float]]]:
    """Constrained classification: each prompt's label with the highest summed log-probability."""
    import torch

    if not labels:
        raise ValueError("score_labels needs at least one label")
    eos = _eos_ids(tok, model)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    end = end if isinstance(end, int) and end in eos else eos[0]
    conts = [tok(lab, add_special_tokens=False)["input_ids"] + [end] for lab in labels]
    prompt_rows = _encode(tok, [render(tok, p) for p in prompts])
    order = sorted(range(len(prompt_rows)), key=lambda i: (-len(prompt_rows[i]), i))
    scores: list[list[float] | None] = [None] * len(prompt_rows)
    with ExampleProgress(len(prompt_rows), description, progress) as bar, torch.inference_mode():
        for chunk in _batches(order, batch_size):
            for i, row in zip(chunk, _label_logprobs(model, [prompt_rows[i] for i in chunk], conts, _pad_id(tok))):
                scores[i] = row
            bar.advance(len(chunk))
    preds = [labels[max(range(len(labels)), key=lambda j: (s[j], -j))] for s in scores]  # type: ignore[index]
    return preds, scores  # type: ignore[return-value]


def text_nll(model, tok, texts: Sequence[str], batch_size: int = 8) -> tuple[float, int]:
    """Summed next-token NLL over ``texts`` (plain text, no template) and the number of scored tokens."""
    import torch

    rows = [r for r in _encode(tok, list(texts)) if len(r) >= 2]
    total, count = 0.0, 0
    with torch.inference_mode():
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            ids, mask, pos = _left_pad(chunk, _pad_id(tok))
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            tgt_lp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
            valid = mask[:, 1:].bool() & mask[:, :-1].bool()
            total += float(-(tgt_lp * valid).sum())
            count += int(valid.sum())
    return total, count
