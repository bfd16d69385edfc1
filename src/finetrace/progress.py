"""Progress reporting: library code calls a callback, only the faces draw (``cli/progress.py``).

A long-running stage function (``train``, ``evaluate``, ``import_dataset``, ``run_pipeline``) takes
``progress``: None (quiet) or a callable ``progress(task, done, total, note)``::

    progress("train", 12, 100, "loss 1.2345  410 tok/s")      # total None: a count without an end
"""

from __future__ import annotations

import time
from collections.abc import Callable

Progress = Callable[[str, int, int | None, str], None]


def callback(progress) -> Progress | None:
    """``progress`` if it is a callback, else None (False and the old ``True`` flag draw nothing here)."""
    return progress if callable(progress) else None


class Counter:
    """Counts work done for one task and reports it with a per-second rate: ``bar.advance(n)``.

    ``with Counter(progress, "base: generate", total, "examples") as bar: bar.advance(8)``
    """

    def __init__(self, progress: Progress | None, task: str, total: int | None, unit: str = "examples"):
        self.progress, self.task, self.total, self.unit = callback(progress), task, total, unit
        self.done, self._t0 = 0, time.perf_counter()

    def __enter__(self) -> Counter:
        self._t0 = time.perf_counter()
        if self.progress is not None:
            self.progress(self.task, 0, self.total, "")
        return self

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self._t0
        return self.done / elapsed if elapsed > 0 else 0.0

    def advance(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.task, self.done, self.total, f"{self.rate:,.2f} {self.unit}/s")

    def __exit__(self, *exc) -> None:
        return None
