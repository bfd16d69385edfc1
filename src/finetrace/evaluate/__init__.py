"""Evaluate: task metrics with intervals, base vs tuned, counterfactual bias, forgetting, gates, reports.

    from finetrace.evaluate import evaluate, compare, load_suite
    report = evaluate(ws, "smollm2", "support@1:test", adapter_ref="support-lora@1", suite="suite.yaml")

Modules: ``generation`` (batched greedy generation, label scoring, text NLL), ``metrics`` (per-example
metrics), ``stats`` (bootstrap intervals, paired tests, group fairness), ``bias`` (counterfactual suite
over ``resources/wordlists.json``), ``forgetting`` (perplexity on ``resources/general_text.txt``),
``suite`` (the YAML config and gates), ``gates``, ``evalset`` (dataset split -> examples), ``report``
(JSON + self-contained HTML), ``runner`` (the entry points; progress goes to a ``finetrace.progress`` callback).
"""

from .runner import compare, evaluate, load_report
from .suite import Suite, load_suite

__all__ = ["Suite", "compare", "evaluate", "load_report", "load_suite"]
