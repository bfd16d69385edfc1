"""Library code reports progress through a callback; only cli/progress.py draws (rich)."""

from __future__ import annotations

import pathlib
import re

import finetrace
from finetrace.progress import Counter, callback


def test_counter_reports_counts_totals_and_a_rate():
    seen = []
    with Counter(lambda *a: seen.append(a), "base: generate", 5) as bar:
        bar.advance(2)
        bar.advance(3)
    assert [(t, d, n) for t, d, n, _ in seen] == [
        ("base: generate", 0, 5),
        ("base: generate", 2, 5),
        ("base: generate", 5, 5),
    ]
    assert seen[0][3] == "" and re.fullmatch(r"[\d,]+\.\d\d examples/s", seen[-1][3])
    with Counter(False, "quiet", 3) as bar:  # no callback: nothing is called, counting still works
        bar.advance(3)
    assert bar.done == 3 and callback(True) is None and callback(print) is print


def test_bars_draw_each_task_and_keep_the_last_note(capsys):
    from finetrace.cli.progress import Bars

    with Bars(plain=False) as bars:
        bars("train", 0, 4, "")
        bars("train", 4, 4, "loss 1.2345")
        bars("train", 4, 4, "")
        bars("validate", 10, None, "5 rows/s")
        prog = bars._prog
        tasks = {t.description: t for t in prog.tasks}
    assert tasks["train"].completed == 4 and tasks["train"].total == 4
    assert tasks["train"].fields["note"] == "loss 1.2345" and tasks["validate"].total is None
    assert "train" in capsys.readouterr().err
    with Bars(enabled=False) as quiet:
        quiet("train", 1, 2, "")
    assert quiet._prog is None


def test_only_the_cli_draws():
    src = pathlib.Path(finetrace.__file__).parent
    drawing = sorted(str(p.relative_to(src)) for p in src.rglob("*.py") if "rich.progress" in p.read_text("utf-8"))
    assert drawing == ["cli/progress.py"]


def test_off_a_terminal_bars_write_plain_lines_throttled_and_the_last_one(capsys, monkeypatch):
    import finetrace.cli.progress as progress

    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 3600.0)
    with progress.Bars(plain=True) as bars:
        for step in range(1, 6):
            bars("train", step, 10, f"loss {step}")  # only the first falls outside the interval
        bars("data", 7, None, "rows/s 12")
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["train: 1/10  loss 1", "data: 7  rows/s 12", "train: 5/10  loss 5"]
    assert bars._prog is None  # rich never started: nothing live is drawn into a log


def test_a_repeated_final_update_is_one_plain_line(capsys):
    import finetrace.cli.progress as progress

    with progress.Bars(plain=True) as bars:
        bars("train", 0, 4)
        bars("train", 4, 4, "loss 0.02")  # the last step
        bars("train", 4, 4, "loss 0.02")  # the same, reported again when the run ends
    assert capsys.readouterr().err.splitlines() == ["train: 0/4", "train: 4/4  loss 0.02"]
