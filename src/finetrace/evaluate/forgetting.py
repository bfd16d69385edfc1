"""Forgetting check: perplexity on a small shipped general-text sample, base vs tuned.

A domain adapter that has damaged the model's general language ability shows up as a rise in
perplexity on ordinary English it was never trained on. ``resources/general_text.txt`` holds 42 short
passages written for this project (CC0), one per line; lines starting with ``#`` are comments.

    increase = ppl_tuned / ppl_base - 1        (0.10 = tuned is 10% more perplexed than base)
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..decoding import BASE
from .generation import text_nll
from .metrics import perplexity


def general_text(path: str | Path | None = None) -> list[str]:
    """The shipped sample (or the passages of ``path``, same format)."""
    raw = (
        Path(path).read_text("utf-8")
        if path
        else resources.files(__package__).joinpath("resources/general_text.txt").read_text("utf-8")
    )
    return [ln.strip() for ln in raw.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def text_perplexity(model, tok, texts: list[str], batch_size: int = 8, decoder=None, adapter: str = BASE) -> dict:
    """Perplexity of ``texts`` with every row on LoRA slot ``adapter`` of ``decoder`` (``text_nll``)."""
    nll, n = text_nll(model, tok, texts, batch_size, decoder, adapter)
    return {"perplexity": perplexity(nll, n), "tokens": n, "passages": len(texts)}


def forgetting(base: dict, tuned: dict) -> dict:
    """Compare two ``text_perplexity`` results."""
    return {
        "base_perplexity": base["perplexity"],
        "tuned_perplexity": tuned["perplexity"],
        "increase": tuned["perplexity"] / base["perplexity"] - 1,
        "tokens": base["tokens"],
        "passages": base["passages"],
    }
