"""Choosing the next token of each row: greedy, or temperature + nucleus (top-p) sampling with a per-row seed.

One function, used by the batched engine and the naive baseline alike, so that the two never differ in
how a token is picked. ``temperature == 0`` is greedy (argmax); otherwise
``p = softmax(logits / T)`` restricted to the smallest set of tokens whose mass reaches ``top_p``.
"""

from __future__ import annotations

import torch


def pick_tokens(logits: torch.Tensor, temperatures: list[float], top_ps: list[float],
                generators: list[torch.Generator | None]) -> list[int]:
    """``logits``: (B, V) for the last position of each row; returns one token id per row."""
    greedy = logits.argmax(dim=-1).tolist()  # (B,)
    out = []
    for i, (t, p, g) in enumerate(zip(temperatures, top_ps, generators)):
        if t <= 1e-5:
            out.append(int(greedy[i]))
            continue
        scaled = logits[i].float() / t  # (V,)
        if p < 1.0:
            sorted_logits, order = torch.sort(scaled, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            drop = probs.cumsum(-1) - probs > p  # keep the first token always
            sorted_logits[drop] = float("-inf")
            scaled = torch.full_like(scaled, float("-inf")).scatter(0, order, sorted_logits)
        probs = torch.softmax(scaled, dim=-1)
        out.append(int(torch.multinomial(probs, 1, generator=g).item()))
    return out


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g
