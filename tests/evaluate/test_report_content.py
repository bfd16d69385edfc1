"""The eval report's page and files: gates first, confusion matrix and per-class figures, mistakes with
their inputs, and the Hugging Face ``.eval_results`` YAML (a 6-class task built here, no model needed)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import yaml

from finetrace.evaluate.metrics import accuracy, label_report, macro_f1
from finetrace.evaluate.report import eval_results, mistakes, render_html, write_report
from finetrace.evaluate.suite import Suite

LABELS = ["assignment", "confidentiality", "indemnity", "liability", "termination", "warranty"]


def _report(passed_gate: bool = False) -> dict:
    rng = random.Random(3)
    golds = [LABELS[i % 6] for i in range(60)]
    base = [rng.choice(LABELS) for _ in golds]
    tuned = [g if rng.random() < 0.8 else (None if rng.random() < 0.3 else rng.choice(LABELS)) for g in golds]
    examples = [
        {"i": i, "id": f"c{i}", "group": None, "prompt": f"Clause {i}: <b>text</b> about {g}", "gold": g}
        for i, g in enumerate(golds)
    ]

    def model(ref, preds, adapter):
        return {
            "ref": ref,
            "adapter": adapter,
            "answers": [p or "unsure" for p in preds],
            "correct": [p == g for p, g in zip(preds, golds)],
            "labels": label_report(preds, golds, LABELS),
            "metrics": {"accuracy": {"value": accuracy(preds, golds), "ci": [0.1, 0.9], "n": 60}},
        }

    tuned_m = model("clauses-lora@1", tuned, "sha256:" + "a" * 64)
    thr = 0.0 if passed_gate else 0.99
    tuned_m["gates"] = [
        {
            "name": "min_metric:accuracy",
            "value": tuned_m["metrics"]["accuracy"]["value"],
            "op": ">=",
            "threshold": thr,
            "passed": passed_gate,
            "note": "",
        }
    ]
    tuned_m["passed"] = passed_gate
    return {
        "suite": {**Suite().to_dict(), "name": "clauses"},
        "run_id": "evaluate-20261201T090000-abcdef",
        "date": "2026-12-01",
        "dataset": {
            "ref": "clauses@1",
            "digest": "sha256:" + "d" * 64,
            "split": "test",
            "n": 60,
            "schema": "classification",
            "labels": LABELS,
        },
        "base_model": {"ref": "smollm2@1", "digest": "sha256:" + "b" * 64},
        "metrics": ["accuracy"],
        "primary_metric": "accuracy",
        "models": [model("smollm2@1", base, None), tuned_m],
        "examples": examples,
        "_preds": {"base": base, "tuned": tuned, "gold": golds},
    }


def test_label_report_counts_every_example_once():
    rep = _report()
    preds, golds = rep["_preds"]["tuned"], rep["_preds"]["gold"]
    lr = label_report(preds, golds, LABELS)
    pairs = Counter(zip(golds, [p if p is not None else "(none)" for p in preds]))
    for i, g in enumerate(lr["classes"]):
        for j, c in enumerate(lr["columns"]):
            assert lr["confusion"][i][j] == pairs.get((g, c), 0)
    assert sum(map(sum, lr["confusion"])) == len(golds)
    assert sum(lr["confusion"][i][i] for i in range(6)) / len(golds) == pytest.approx(accuracy(preds, golds))
    assert sum(lr["per_class"][c]["f1"] for c in LABELS) / 6 == pytest.approx(macro_f1(preds, golds, LABELS))
    for c in LABELS:
        tp = pairs[(c, c)]
        predicted = sum(n for (g, p), n in pairs.items() if p == c)
        assert lr["per_class"][c]["recall"] == pytest.approx(tp / golds.count(c))
        assert lr["per_class"][c]["precision"] == (pytest.approx(tp / predicted) if predicted else None)
        assert lr["per_class"][c]["support"] == golds.count(c)


def test_page_opens_with_the_failed_gate_then_confusion_and_mistakes():
    rep = _report(passed_gate=False)
    html = render_html(rep)
    assert html.index('id="verdict"') < html.index("<h2>Metrics</h2>") < html.index('class="confusion"')
    tuned_acc = rep["models"][1]["metrics"]["accuracy"]["value"]
    assert f"A gate FAILED:\nclauses-lora@1 min_metric:accuracy {tuned_acc:.3f} (needs &gt;= 0.990)" in html
    assert 'class="gate-failed"' in html
    assert html.count('class="confusion"') == 2 and html.count('class="per-class"') == 2  # base and tuned
    # inputs are shown escaped, never as markup
    assert "<b>text</b>" not in html and "&lt;b&gt;text&lt;/b&gt;" in html
    mk = mistakes(rep)[0]
    tuned, base, golds = rep["_preds"]["tuned"], rep["_preds"]["base"], rep["_preds"]["gold"]
    wrong = [i for i, (p, g) in enumerate(zip(tuned, golds)) if p != g]
    only_base = [i for i in wrong if base[i] == golds[i]]
    assert mk["wrong"] == len(wrong) > 0 and mk["only_base_right"] == len(only_base)
    assert [r["i"] for r in mk["rows"]] == only_base + [i for i in wrong if i not in only_base]
    assert html.count('class="regression"') == len(only_base)
    assert html.count('<tr class="wrong">') == len(wrong) - len(only_base)
    assert render_html(_report(passed_gate=True)).count("Every gate passed") == 1


def test_eval_results_yaml_beside_the_report(tmp_path):
    rep = _report()
    write_report({k: v for k, v in rep.items() if k != "_preds"}, tmp_path)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == [".eval_results/clauses.yaml", "report.html", "report.json"]
    entries = yaml.safe_load((tmp_path / ".eval_results" / "clauses.yaml").read_text())
    assert entries == eval_results(rep)["clauses.yaml"]
    (e,) = entries
    assert e["dataset"] == {"id": "clauses@1", "task_id": "test/accuracy"}
    assert e["value"] == round(rep["models"][1]["metrics"]["accuracy"]["value"] * 100, 2)
    assert e["date"] == "2026-12-01" and "evaluate-20261201T090000-abcdef" in e["notes"]
