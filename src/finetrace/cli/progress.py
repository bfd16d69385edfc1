"""The one progress drawer: rich bars on stderr, one per task, fed by the library's progress callbacks.

with Bars() as bars:
    train(ws, cfg, progress=bars)        # bars("train", done, total, note) draws or updates a bar
"""

from __future__ import annotations

from typing import Any


class Bars:
    """A callable ``(task, done, total, note)`` that draws a rich bar per task on stderr (a count and
    its note when ``total`` is None); ``enabled=False`` draws nothing. Use as a context manager."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._prog: Any = None
        self._tasks: dict[str, int] = {}

    def __call__(self, task: str, done: int, total: int | None, note: str = "") -> None:
        if not self.enabled:
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

    def close(self) -> None:
        if self._prog is not None:
            self._prog.stop()
            self._prog = None

    def __enter__(self) -> Bars:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
