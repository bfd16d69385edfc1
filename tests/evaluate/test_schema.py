"""The typed eval report (evaluate/schema.py): old reports load, bad ones are refused naming the field, and
what was read is given back unchanged."""

from __future__ import annotations

import copy

import pytest

from finetrace.errors import InputError
from finetrace.evaluate import EvalReport


def old_report() -> dict:
    """A report as the first finetrace version wrote it: no ``date``, ``correct``, ``answer_tokens``,
    ``labels`` or example prompts, and a suite without ``max_new_tokens``."""
    metric = lambda v: {"value": v, "ci": [v - 0.1, v + 0.05], "n": 2}
    return {
        "format": "finetrace-eval-report/1",
        "run_id": "evaluate-20261128T120000-ab12cd",
        "suite": {"name": "clauses", "bootstrap": {"confidence": 0.9, "samples": 100, "seed": 0}},
        "suite_digest": "sha256:" + "1" * 64,
        "dataset": {
            "digest": "sha256:" + "2" * 64,
            "ref": "clauses@1",
            "split": "test",
            "schema": "classification",
            "labels": ["a", "b"],
            "n": 2,
        },
        "base_model": {"digest": "sha256:" + "3" * 64, "ref": "tiny@1"},
        "metrics": ["accuracy"],
        "primary_metric": "accuracy",
        "task": "classification",
        "models": [
            {
                "name": "base",
                "ref": "tiny@1",
                "adapter": None,
                "metrics": {"accuracy": metric(0.5)},
                "answers": ["a", "a"],
            },
            {
                "name": "lora@1",
                "ref": "lora@1",
                "adapter": "sha256:" + "4" * 64,
                "metrics": {"accuracy": metric(1.0)},
                "answers": ["a", "b"],
                "vs_base": {
                    "accuracy": {"delta": 0.5, "ci": [0.0, 1.0], "p_value": 0.2, "test": "paired_bootstrap"},
                    "mcnemar": {"b": 0, "c": 1, "p_value": 1.0, "test": "mcnemar_exact"},
                },
                "bias": {
                    "flip_rate": 0.25,
                    "group_gap": 0.1,
                    "templates": True,
                    "categories": {
                        "gender": {"n_examples": 4, "flip_rate": 0.25, "gap": 0.1, "groups": {}, "pairs": []}
                    },
                },
                "forgetting": {"base_perplexity": 10.0, "tuned_perplexity": 11.0, "increase": 0.1},
                "gates": [
                    {
                        "name": "min_metric:accuracy",
                        "value": 1.0,
                        "threshold": 0.8,
                        "op": ">=",
                        "passed": True,
                        "note": "",
                    },
                    {"name": "max_flip_rate", "value": 0.25, "threshold": 0.1, "op": "<=", "passed": False, "note": ""},
                ],
                "passed": False,
            },
        ],
        "examples": [
            {"i": 0, "id": "r0", "group": None, "gold": "a"},
            {"i": 1, "id": "r1", "group": None, "gold": "b"},
        ],
    }


def test_an_old_report_loads_with_typed_access():
    rep = EvalReport.parse(old_report())
    assert rep.primary_metric == "accuracy" and rep.confidence == 0.9 and rep.date is None
    assert rep.base is not None and rep.base.ref == "tiny@1" and rep.base.correct is None
    assert [m.ref for m in rep.tuned] == ["lora@1"] and rep.last is rep.tuned[0]
    tuned = rep.subject("sha256:" + "4" * 64)
    assert tuned is rep.last and rep.subject("sha256:" + "5" * 64) is None
    assert tuned.values() == {"accuracy": 1.0} and tuned.metrics["accuracy"].ci == [0.9, 1.05]
    assert tuned.vs_base["accuracy"].delta == 0.5 and tuned.vs_base["mcnemar"].model_extra == {"b": 0, "c": 1}
    assert tuned.bias.categories["gender"].flip_rate == 0.25 and tuned.forgetting.increase == 0.1
    assert [g.name for g in tuned.failed_gates()] == ["max_flip_rate"] and tuned.passed is False
    assert rep.suite.max_new_tokens == 64 and rep.suite.scoring == "constrained"  # defaults of older suites
    assert rep.dataset.schema_ == "classification" and rep.examples[1].prompt == ""


def test_to_dict_gives_back_what_was_read_extra_keys_included():
    data = old_report()
    data["models"][1]["a_later_field"] = {"x": [1, 2]}
    data["new_section"] = "kept"
    rep = EvalReport.parse(copy.deepcopy(data))
    assert rep.to_dict() == data
    no_examples = rep.to_dict(examples=False)
    assert "examples" not in no_examples and no_examples["new_section"] == "kept"
    assert rep.last.to_dict() == data["models"][1]


@pytest.mark.parametrize(
    "path, value, field",
    [
        (("models", 1, "metrics", "accuracy", "value"), "high", "models.1.metrics.accuracy.value"),
        (("dataset", "n"), None, "dataset.n"),
        (("models", 0, "gates"), [{"name": "g"}], "models.0.gates.0.threshold"),
    ],
)
def test_a_bad_report_is_refused_naming_the_field(path, value, field):
    data = old_report()
    node = data
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    with pytest.raises(InputError, match=rf"^eval/report.json field '{field}'"):
        EvalReport.parse(data, source="eval/report.json")


def test_a_missing_section_is_refused():
    data = old_report()
    del data["models"]
    with pytest.raises(InputError, match="field 'models'.*Field required"):
        EvalReport.parse(data)
