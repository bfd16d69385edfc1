"""Answer text: stop strings, what may be streamed yet, and the one normalisation of a finished answer.

A row's text is decoded from its generated ids (special tokens skipped). It ends at the first stop string
(cut, not included). While streaming, the tail that could still become a stop string, or an incomplete
UTF-8 character, is held back. ``normalise_answer`` is applied by every caller to a finished answer:
evaluate records it, serve returns it, ``generate`` prints it.
"""

from __future__ import annotations

from collections.abc import Sequence


def find_stop(text: str, stop: Sequence[str]) -> int:
    """Index of the earliest stop string in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else -1


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest stop string."""
    i = find_stop(text, stop)
    return text if i < 0 else text[:i]


def holdback(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` not to stream yet: a possible start of a stop string, or an
    incomplete UTF-8 character (decoded as U+FFFD)."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    if text.endswith("\ufffd"):
        n = max(n, 1)
    return n


def normalise_answer(text: str) -> str:
    """The answer as recorded and returned: surrounding whitespace removed (nothing else)."""
    return text.strip()
