"""Evaluate: task metrics with intervals, base vs tuned, counterfactual bias, forgetting, gates, reports.

    from finetrace.evaluate import evaluate, compare, load_suite
    report = evaluate(ws, "smollm2", "support@1:test", adapter_ref="support-lora@1", suite="suite.yaml")

Modules: ``generation`` (batched greedy generation, label scoring, text NLL), ``metrics`` (per-example
metrics), ``stats`` (bootstrap intervals, paired tests, group fairness), ``bias`` (counterfactual suite
over ``resources/wordlists.json``), ``forgetting`` (perplexity on ``resources/general_text.txt``),
``suite`` (the YAML config and gates), ``gates``, ``evalset`` (dataset split -> examples), ``report``
(JSON + self-contained HTML), ``schema`` (the typed report every reader reads), ``runner`` (the entry
points; progress goes to a ``finetrace.progress`` callback).
"""

from typing import TYPE_CHECKING

from .schema import EvalReport, ModelResult, read_report
from .suite import Suite, load_suite

if TYPE_CHECKING:
    from .runner import compare, evaluate, load_report

_RUNNER = ("compare", "evaluate", "load_report")  # loaded on first use: the runner imports torch


def __getattr__(name: str):
    if name in _RUNNER:
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EvalReport", "ModelResult", "Suite", "compare", "evaluate", "load_report", "load_suite", "read_report"]
