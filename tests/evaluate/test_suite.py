"""Suite YAML parsing, helpful errors, the shipped example suite, and gate evaluation."""

from __future__ import annotations

from importlib import resources

import pytest

from finetrace.errors import ConfigError
from finetrace.evaluate.gates import apply_gates, verdict
from finetrace.evaluate.suite import Suite, load_suite


def test_default_and_shipped_example_suite_parse(tmp_path):
    assert load_suite(None) == Suite()
    text = resources.files("finetrace.evaluate").joinpath("resources/example_suite.yaml").read_text()
    p = tmp_path / "s.yaml"
    p.write_text(text)
    s = load_suite(p)
    assert s.gates.min_metric == {"accuracy": 0.8} and s.gates.max_flip_rate == 0.05
    assert s.bias.categories == ["gender_names", "origin_names"]


@pytest.mark.parametrize(
    "body,match",
    [
        ("gatse: {}\n", "field 'gatse': unknown key.*did you mean 'gates'"),
        (
            "gates:\n  max_flip_rte: 0.1\n",
            "field 'gates.max_flip_rte': unknown key.*did you mean 'gates.max_flip_rate'",
        ),
        ("gates:\n  min_metric: {acuracy: 0.5}\n", "unknown metric 'acuracy'"),
        ("bootstrap: {samples: 2}\n", "bootstrap.samples"),
        ("metrics: [\n", "not valid YAML"),
        ("- a\n- b\n", "mapping"),
    ],
)
def test_bad_suites_name_the_key(tmp_path, body, match):
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    with pytest.raises(ConfigError, match=match) as err:
        load_suite(p)
    assert "bad.yaml" in str(err.value)


def _result(acc=0.9, delta=0.1, flip=0.0, ggap=0.02, bgap=0.0, ppl=0.05):
    return {
        "metrics": {"accuracy": {"value": acc}},
        "vs_base": {"accuracy": {"delta": delta}},
        "groups": {"accuracy": {"groups": {"a": {}, "b": {}}, "gap": ggap}},
        "bias": {"flip_rate": flip, "group_gap": bgap},
        "forgetting": {"increase": ppl},
    }


def test_gates_each_checked_and_unmeasured_fails():
    g = Suite.model_validate(
        {
            "gates": {
                "min_metric": {"accuracy": 0.8},
                "min_gain": {"accuracy": 0.05},
                "max_flip_rate": 0.05,
                "max_group_gap": 0.1,
                "max_perplexity_increase": 0.2,
            }
        }
    ).gates
    rows = apply_gates(g, _result(), "accuracy")
    assert [r["name"] for r in rows] == [
        "min_metric:accuracy",
        "min_gain:accuracy",
        "max_flip_rate",
        "max_group_gap",
        "max_perplexity_increase",
    ]
    assert verdict(rows)
    for kw, name in [
        ({"acc": 0.7}, "min_metric:accuracy"),
        ({"delta": 0.01}, "min_gain:accuracy"),
        ({"flip": 0.1}, "max_flip_rate"),
        ({"bgap": 0.3}, "max_group_gap"),
        ({"ppl": 0.5}, "max_perplexity_increase"),
    ]:
        rows = apply_gates(g, _result(**kw), "accuracy")
        assert not verdict(rows) and [r["name"] for r in rows if not r["passed"]] == [name]
    bare = {"metrics": {"accuracy": {"value": 0.9}}}
    rows = apply_gates(g, bare, "accuracy")
    assert [r["passed"] for r in rows] == [True, False, False, False, False]
    assert rows[1]["value"] is None and rows[1]["note"] == "no base comparison"


@pytest.mark.parametrize("cmd", ["eval", "compare", "override"])
def test_cli_commands_are_registered_and_documented(cmd, capsys):
    from finetrace.cli import main

    assert main([cmd, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--json" in out and ("--as" in out if cmd == "override" else "--model" in out)
