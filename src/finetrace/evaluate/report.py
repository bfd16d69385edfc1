"""The eval report as files: ``report.json`` (the data), ``report.html`` (one self-contained page) and
``.eval_results/<suite>.yaml`` (the Hugging Face Hub's eval-results format, ready to upload beside the
model card).

The page (``templates/report.html.jinja``, autoescaped) opens with the gate verdicts (pass or fail, each
gate with its value and threshold), then the metrics, and for label tasks the confusion matrix and
per-class precision and recall; then the examples the tuned model gets wrong (and those only the base
gets right) with their inputs. It has no external resources: charts are inline SVG drawn by
``finetrace.charts`` (``<svg class="chart ...">``), so it renders offline, in an audit bundle, years
later. Charts: base vs tuned per metric with bootstrap interval whiskers (``chart-metrics``), the
primary metric per dataset group (``chart-groups``), the counterfactual flip rate per category
(``chart-flips``) and the metric per counterfactual group (``chart-bias-groups``), perplexity base vs
tuned (``chart-forgetting``); then the worst counterfactual pairs with the examples that flipped, and the first answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..atomic import write_text
from ..charts import bar_chart, fmt
from .schema import EvalReport

MAX_MISTAKES = 50


def _environment():
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(
        loader=PackageLoader("finetrace.evaluate", "templates"), autoescape=select_autoescape(["html", "jinja"])
    )
    env.filters["fmt"] = fmt
    env.filters["svg"] = lambda chart: chart  # charts are Markup already (finetrace.charts, autoescaped)
    return env


def mistakes(report: dict, limit: int = MAX_MISTAKES) -> list[dict]:
    """Per adapter, the examples it gets wrong, with their inputs; ``only_base_right`` marks regressions.

    ``[{"ref", "wrong": n, "only_base_right": n, "rows": [{"i", "input", "gold", "base", "tuned",
    "only_base_right"}]}]``: regressions first, then the other mistakes, at most ``limit`` rows each.
    Reports written before per-example correctness was recorded give an empty list.
    """
    models = report["models"]
    base = next((m for m in models if not m.get("adapter")), None)
    out = []
    for m in models:
        if not m.get("adapter") or "correct" not in m:
            continue
        base_ok = base.get("correct") if base else None
        rows = []
        for ex in report["examples"]:
            i = ex["i"]
            if m["correct"][i]:
                continue
            only_base = bool(base_ok and base_ok[i])
            rows.append(
                {
                    "i": i,
                    "id": ex.get("id"),
                    "input": ex.get("prompt", ""),
                    "gold": ex["gold"],
                    "base": base["answers"][i] if base else None,
                    "tuned": m["answers"][i],
                    "only_base_right": only_base,
                }
            )
        rows.sort(key=lambda r: (not r["only_base_right"], r["i"]))
        out.append(
            {
                "ref": m["ref"],
                "wrong": len(rows),
                "n": len(m["correct"]),
                "only_base_right": sum(r["only_base_right"] for r in rows),
                "rows": rows[:limit],
            }
        )
    return out


def eval_results(report: dict) -> dict[str, list[dict]]:
    """The Hugging Face ``.eval_results/`` files of a report: ``{file name: [entries]}``.

    One file per evaluated adapter (``<suite>.yaml``, or ``<suite>-<adapter name>.yaml`` when a report
    compares several), one entry per metric: ``dataset: {id, task_id}`` (the finetrace dataset ref and
    ``split/metric``), ``value`` (percent), ``date``, ``source: {name}`` and ``notes`` naming the split, the
    interval and the ledger run. Add a ``source.url`` (where the report is published) before uploading.
    """
    suite = report["suite"]["name"]
    ds = report["dataset"]
    tuned = [m for m in report["models"] if m.get("adapter")] or report["models"][:1]
    files: dict[str, list[dict]] = {}
    for m in tuned:
        name = suite if len(tuned) == 1 else f"{suite}-{m['ref'].split('@')[0].replace('/', '-')}"
        files[f"{name}.yaml"] = [
            {
                "dataset": {"id": ds["ref"], "task_id": f"{ds['split']}/{metric}"},
                "value": round(float(m["metrics"][metric]["value"]) * 100, 2),
                "date": report.get("date") or "",
                "source": {"name": f"finetrace eval report (ledger run {report['run_id']})"},
                "notes": (
                    f"{metric} (percent) on {ds['n']} examples of split {ds['split']}, "
                    f"{report['suite']['bootstrap']['confidence']:.0%} CI "
                    f"[{m['metrics'][metric]['ci'][0] * 100:.1f}, {m['metrics'][metric]['ci'][1] * 100:.1f}]; "
                    f"{m['ref']} on {report['base_model']['ref']}; ledger run {report['run_id']}"
                ),
            }
            for metric in report["metrics"]
        ]
    return files


def _charts(report: dict) -> dict:
    """Every chart of the page, as SVG strings keyed by section."""
    models, metrics, primary = report["models"], report["metrics"], report["primary_metric"]
    conf = int(round(report["suite"]["bootstrap"]["confidence"] * 100))
    out: dict = {"conf": conf, "bias_groups": {}}
    series = [
        {
            "name": m["ref"],
            "values": [m["metrics"][k]["value"] for k in metrics],
            "ci": [m["metrics"][k]["ci"] for k in metrics],
        }
        for m in models
    ]
    out["metrics"] = bar_chart(f"Metrics with {conf}% bootstrap intervals", metrics, series, "chart-metrics", ymax=1.0)
    if any(m.get("groups") for m in models):
        groups = sorted({g for m in models for g in (m.get("groups") or {}).get(primary, {}).get("groups", {})})
        gs = [
            {
                "name": m["ref"],
                "values": [
                    (m.get("groups") or {}).get(primary, {}).get("groups", {}).get(g, {}).get("value") for g in groups
                ],
            }
            for m in models
        ]
        out["groups"] = bar_chart(f"{primary} per group", groups, gs, "chart-groups", ymax=1.0)
    biased = [m for m in models if m.get("bias")]
    if biased:
        cats = sorted({c for m in biased for c in m["bias"]["categories"]})
        fs = [
            {"name": m["ref"], "values": [m["bias"]["categories"].get(c, {}).get("flip_rate") for c in cats]}
            for m in biased
        ]
        out["flips"] = bar_chart("Answer flip rate per category", cats, fs, "chart-flips", ymax=1.0)
        for m in biased:
            out["bias_groups"][m["ref"]] = [
                bar_chart(
                    f"{m['ref']}: {primary} per {c} group (gap {cr['gap']:.3f})",
                    list(cr["groups"]),
                    [{"name": m["ref"], "values": [cr["groups"][x]["value"] for x in cr["groups"]]}],
                    "chart-bias-groups",
                    ymax=1.0,
                )
                for c, cr in m["bias"]["categories"].items()
                if cr.get("groups")
            ]
    fg = [m for m in models if m.get("forgetting")]
    if fg:
        out["forgetting"] = bar_chart(
            "Perplexity on the general-text sample",
            ["perplexity"],
            [{"name": "base", "values": [fg[0]["forgetting"]["base_perplexity"]]}]
            + [{"name": m["ref"], "values": [m["forgetting"]["tuned_perplexity"]]} for m in fg],
            "chart-forgetting",
        )
    return out


def render_html(report: dict) -> str:
    """The self-contained HTML page of a report (see the module docstring for its sections)."""
    models = report["models"]
    gated = [m for m in models if m.get("gates")]
    return (
        _environment()
        .get_template("report.html.jinja")
        .render(
            r=report,
            models=models,
            metrics=report["metrics"],
            primary=report["primary_metric"],
            gated=gated,
            all_passed=all(m["passed"] for m in gated),
            charts=_charts(report),
            labelled=[m for m in models if m.get("labels")],
            mistakes=mistakes(report),
            biased=[m for m in models if m.get("bias")],
            examples=report["examples"][:25],
        )
    )


def write_report(report: dict, folder: Path) -> None:
    """Write ``report.json`` (checked against ``schema.EvalReport`` first), ``report.html`` and ``.eval_results/``."""
    EvalReport.parse(report, source="report.json")
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "report.json", json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n")
    write_text(folder / "report.html", render_html(report))
    for name, entries in eval_results(report).items():
        (folder / ".eval_results").mkdir(exist_ok=True)
        write_text(folder / ".eval_results" / name, yaml.safe_dump(entries, sort_keys=False, allow_unicode=True))
