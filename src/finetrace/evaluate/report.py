"""The eval report as files: ``report.json`` (the data) and ``report.html`` (one self-contained page).

The HTML has no external resources: charts are inline SVG (``<svg class="chart ...">``), so the page
renders offline, in an audit bundle, years later. Charts: base vs tuned per metric with bootstrap
interval whiskers (``chart-metrics``), the primary metric per dataset group (``chart-groups``), the
counterfactual flip rate per category (``chart-flips``) and the metric per counterfactual group
(``chart-bias-groups``), perplexity base vs tuned (``chart-forgetting``); then the gates, the worst
counterfactual pairs with the examples that flipped, and the first answers.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from ..atomic import write_text

PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def bar_chart(title: str, categories: list[str], series: list[dict], cls: str, ymax: float | None = None) -> str:
    """Grouped vertical bars; ``series``: ``[{"name", "values": [..], "ci": [[lo, hi], ..] | None}]``."""
    W, H, left, bottom, top = 640, 300, 50, 60, 30
    plot_w, plot_h = W - left - 150, H - bottom - top
    vals = [v for s in series for v in s["values"] if v is not None]
    his = [c[1] for s in series for c in (s.get("ci") or []) if c]
    ymax = ymax or max([1e-9, *vals, *his]) * 1.1
    ncat, nser = max(1, len(categories)), max(1, len(series))
    slot = plot_w / ncat
    bw = slot * 0.8 / nser

    def y(v: float) -> float:
        return top + plot_h - plot_h * max(0.0, min(v, ymax)) / ymax

    out = [f'<svg class="chart {cls}" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" role="img" aria-label="{_e(title)}">',
           f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="14" font-weight="bold">{_e(title)}</text>',
           f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#333"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>']
    for k in range(5):
        v = ymax * k / 4
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="10">{v:.2f}</text>'
                   f'<line x1="{left}" y1="{y(v):.1f}" x2="{left + plot_w}" y2="{y(v):.1f}" stroke="#eee"/>')
    for ci_, cat in enumerate(categories):
        x0 = left + ci_ * slot + slot * 0.1
        out.append(f'<text x="{left + ci_ * slot + slot / 2:.1f}" y="{top + plot_h + 16}" text-anchor="middle" '
                   f'font-size="11">{_e(cat)}</text>')
        for si, s in enumerate(series):
            v = s["values"][ci_]
            if v is None:
                continue
            x = x0 + si * bw
            out.append(f'<rect class="bar" x="{x:.1f}" y="{y(v):.1f}" width="{bw * 0.9:.1f}" '
                       f'height="{top + plot_h - y(v):.1f}" fill="{PALETTE[si % len(PALETTE)]}">'
                       f'<title>{_e(s["name"])} {_e(cat)}: {_fmt(v)}</title></rect>')
            ci = (s.get("ci") or [None] * len(categories))[ci_]
            if ci:
                cx = x + bw * 0.45
                out.append(f'<g class="ci" stroke="#111"><line x1="{cx:.1f}" y1="{y(ci[0]):.1f}" x2="{cx:.1f}" '
                           f'y2="{y(ci[1]):.1f}"/><line x1="{cx - 4:.1f}" y1="{y(ci[0]):.1f}" x2="{cx + 4:.1f}" '
                           f'y2="{y(ci[0]):.1f}"/><line x1="{cx - 4:.1f}" y1="{y(ci[1]):.1f}" x2="{cx + 4:.1f}" '
                           f'y2="{y(ci[1]):.1f}"/></g>')
    for si, s in enumerate(series):
        ly = top + 14 + si * 18
        out.append(f'<rect x="{left + plot_w + 12}" y="{ly - 10}" width="12" height="12" '
                   f'fill="{PALETTE[si % len(PALETTE)]}"/><text x="{left + plot_w + 30}" y="{ly}" '
                   f'font-size="11">{_e(s["name"])}</text>')
    out.append("</svg>")
    return "".join(out)


def _table(head: list[str], rows: list[list], cls: str = "") -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{_e(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>'


def render_html(report: dict) -> str:
    models = report["models"]
    metrics = report["metrics"]
    primary = report["primary_metric"]
    parts = [f"<h1>Evaluation report: {_e(report['suite']['name'])}</h1>",
             f"<p>Dataset <code>{_e(report['dataset']['ref'])}</code> split <b>{_e(report['dataset']['split'])}</b> "
             f"({report['dataset']['n']} examples, {_e(report['dataset']['schema'])}); base model "
             f"<code>{_e(report['base_model']['ref'])}</code>; run <code>{_e(report['run_id'])}</code>.</p>"]
    # metrics with intervals
    series = [{"name": m["ref"], "values": [m["metrics"][k]["value"] for k in metrics],
               "ci": [m["metrics"][k]["ci"] for k in metrics]} for m in models]
    conf = int(round(report["suite"]["bootstrap"]["confidence"] * 100))
    parts.append("<h2>Metrics</h2>" + bar_chart(f"Metrics with {conf}% bootstrap intervals", metrics, series,
                                                "chart-metrics", ymax=1.0))
    rows = []
    for m in models:
        for k in metrics:
            vb = (m.get("vs_base") or {}).get(k) or {}
            rows.append([m["ref"], k, m["metrics"][k]["value"],
                         f"[{m['metrics'][k]['ci'][0]:.3f}, {m['metrics'][k]['ci'][1]:.3f}]",
                         vb.get("delta"), vb.get("p_value")])
    parts.append(_table(["model", "metric", "value", f"{conf}% CI", "delta vs base", "p (paired bootstrap)"],
                        rows, "metrics"))
    mc = [(m["ref"], m["vs_base"]["mcnemar"]) for m in models if (m.get("vs_base") or {}).get("mcnemar")]
    if mc:
        parts.append(_table(["model", "only base right", "only tuned right", "McNemar exact p"],
                            [[r, x["b"], x["c"], x["p_value"]] for r, x in mc], "mcnemar"))
    # per dataset group
    if any(m.get("groups") for m in models):
        groups = sorted({g for m in models for g in (m.get("groups") or {}).get(primary, {}).get("groups", {})})
        gs = [{"name": m["ref"], "values": [(m.get("groups") or {}).get(primary, {}).get("groups", {})
                                            .get(g, {}).get("value") for g in groups]} for m in models]
        parts.append(f"<h2>By group ({_e(primary)})</h2>" + bar_chart(f"{primary} per group", groups, gs,
                                                                       "chart-groups", ymax=1.0))
        frows = [[m["ref"], m["groups"][primary]["gap"], (m.get("fairness") or {}).get("demographic_parity_difference"),
                  (m.get("fairness") or {}).get("equalized_odds_difference")] for m in models if m.get("groups")]
        parts.append(_table(["model", "group gap", "demographic parity diff", "equalized odds diff"], frows,
                            "fairness"))
    # bias
    biased = [m for m in models if m.get("bias")]
    if biased:
        cats = sorted({c for m in biased for c in m["bias"]["categories"]})
        fs = [{"name": m["ref"], "values": [m["bias"]["categories"].get(c, {}).get("flip_rate") for c in cats]}
              for m in biased]
        parts.append("<h2>Counterfactual bias</h2>" + bar_chart("Answer flip rate per category", cats, fs,
                                                                "chart-flips", ymax=1.0))
        for m in biased:
            for c, cr in m["bias"]["categories"].items():
                if not cr.get("groups"):
                    continue
                g = list(cr["groups"])
                parts.append(bar_chart(f"{m['ref']}: {primary} per {c} group (gap {cr['gap']:.3f})", g,
                                       [{"name": m["ref"], "values": [cr["groups"][x]["value"] for x in g]}],
                                       "chart-bias-groups", ymax=1.0))
            flips = []
            for p in m["bias"]["worst_pairs"]:
                for ex in p["examples"]:
                    flips.append([p["category"], f"{p['a']} vs {p['b']}", p["flip_rate"], ex["input_a"],
                                  ex["answer_a"], ex["input_b"], ex["answer_b"]])
            parts.append(f"<h3>{_e(m['ref'])}: worst pairs and flipped examples</h3>" + (
                _table(["category", "pair", "flip rate", "input A", "answer A", "input B", "answer B"], flips, "flips")
                if flips else "<p class='noflips'>No answer changed under any counterfactual swap.</p>"))
    # forgetting
    fg = [m for m in models if m.get("forgetting")]
    if fg:
        base_ppl = fg[0]["forgetting"]["base_perplexity"]
        parts.append("<h2>Forgetting (general-text perplexity)</h2>" + bar_chart(
            "Perplexity on the general-text sample", ["perplexity"],
            [{"name": "base", "values": [base_ppl]}] + [{"name": m["ref"], "values": [m["forgetting"]["tuned_perplexity"]]}
                                                         for m in fg], "chart-forgetting"))
    # gates
    gated = [m for m in models if m.get("gates")]
    if gated:
        parts.append("<h2>Gates</h2>")
        for m in gated:
            status = "PASSED" if m["passed"] else "FAILED"
            parts.append(f"<p class='verdict {status.lower()}'>{_e(m['ref'])}: <b>{status}</b></p>" + _table(
                ["gate", "value", "op", "threshold", "passed", "note"],
                [[g["name"], g["value"], g["op"], g["threshold"], g["passed"], g.get("note", "")] for g in m["gates"]],
                "gates"))
    # answers
    head = ["#", "group", "gold"] + [m["ref"] for m in models]
    rows = [[ex["i"], ex.get("group") or "", ex["gold"]] + [m["answers"][ex["i"]] for m in models]
            for ex in report["examples"][:25]]
    parts.append("<h2>First answers</h2>" + _table(head, rows, "answers"))
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:12px;vertical-align:top}"
             ".failed b{color:#c44e52}.passed b{color:#55a868}svg.chart{display:block;margin:1em 0}")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>finetrace eval report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def write_report(report: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "report.json", json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n")
    write_text(folder / "report.html", render_html(report))
