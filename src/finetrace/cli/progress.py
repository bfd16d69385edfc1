"""The one progress drawer: rich bars on stderr, one per task, fed by the library's progress callbacks.
When stderr is not a terminal (CI, a log file, a pipe) rich draws nothing live, so plain lines are written
instead: one per task at most every ``PLAIN_EVERY_S`` seconds, plus the last update.

with Bars() as bars:
    train(ws, cfg, progress=bars)        # bars("train", done, total, note) draws or updates a bar
"""

from __future__ import annotations

import sys
import time
from typing import Any

PLAIN_EVERY_S = 10.0


class Bars:
    """A callable ``(task, done, total, note)`` that draws a rich bar per task on stderr (a count and
    its note when ``total`` is None); ``enabled=False`` draws nothing. Use as a context manager."""

    def __init__(self, enabled: bool = True, plain: bool | None = None):
        self.enabled = enabled
        self._prog: Any = None
        self._tasks: dict[str, int] = {}
        self._plain = (not sys.stderr.isatty()) if plain is None else plain  # default: plain lines off a terminal
        # task -> (printed at, done, total, note, last update held back)
        self._last: dict[str, tuple[float | None, int, int | None, str, bool]] = {}

    def __call__(self, task: str, done: int, total: int | None, note: str = "") -> None:
        if not self.enabled:
            return
        if self._plain:
            self._line(task, done, total, note)
            return
        if self._prog is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._prog = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[note]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._prog.start()
        if task not in self._tasks:
            self._tasks[task] = self._prog.add_task(task, total=total, completed=done, note=note)
        else:  # an empty note keeps the last one
            self._prog.update(self._tasks[task], completed=done, total=total, **({"note": note} if note else {}))

    def _line(self, task: str, done: int, total: int | None, note: str) -> None:
        now = time.monotonic()
        printed, last_done, last_total, last_note, _ = self._last.get(task, (None, 0, None, "", False))
        note = note or last_note
        if printed is not None and (done, total, note) == (last_done, last_total, last_note):
            return  # nothing new (a final update repeated): not a second line
        due = printed is None or now - printed >= PLAIN_EVERY_S or (total is not None and done >= total)
        if due:
            self._emit(task, done, total, note)
        self._last[task] = (now if due else printed, done, total, note, not due)

    @staticmethod
    def _emit(task: str, done: int, total: int | None, note: str) -> None:
        count = f"{done}/{total}" if total is not None else f"{done}"
        print(f"{task}: {count}" + (f"  {note}" if note else ""), file=sys.stderr, flush=True)

    def close(self) -> None:
        for task, (_, done, total, note, held_back) in self._last.items():
            if held_back:  # the last update fell inside the interval: show it
                self._emit(task, done, total, note)
        self._last.clear()
        if self._prog is not None:
            self._prog.stop()
            self._prog = None

    def __enter__(self) -> Bars:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
