"""Charts, the one way finetrace draws them: geometry computed here, SVG markup in Jinja templates.

    bar_chart("Metrics", ["accuracy"], [{"name": "base", "values": [0.4], "ci": [[0.3, 0.5]]}], "chart-metrics")
    timeline(runs)        loss_curve(history)        graph(nodes, edges, width, height)

Every function returns ``Markup`` (inline SVG, no external resources), so the eval report page, the
audit documents and the console embed it as is. The templates (``templates/*.svg.jinja``) are
autoescaped: a label from a user (a dataset name, a run id) is escaped by Jinja, never by hand.
Colours: ``PALETTE`` for series, ``STATUS_COLOURS`` for run states, ``KIND_COLOURS`` for artifact kinds.
"""

from __future__ import annotations

from datetime import datetime
from functools import cache

from markupsafe import Markup

PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
STATUS_COLOURS = {"succeeded": "#55a868", "failed": "#c44e52", "running": "#4c72b0", "interrupted": "#dd8452"}
KIND_COLOURS = {
    "dataset": "#e3ecf7",
    "adapter": "#fdebd8",
    "base_model": "#e8f3e8",
    "eval_report": "#f1e6f5",
    "document": "#f5f1e1",
    "source": "#eeeeee",
    "answer": "#fff2b3",
    "run": "#ffffff",
}


def fmt(v) -> str:
    """A value as charts and reports print it: ``n/a``, three decimals for floats, else ``str``."""
    return "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


@cache
def _env():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=PackageLoader("finetrace.charts", "templates"),
        undefined=StrictUndefined,
        autoescape=select_autoescape(["jinja"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt
    env.filters["f1"] = lambda v: f"{v:.1f}"  # coordinates: one decimal
    return env


def _render(name: str, **context) -> Markup:
    return Markup(_env().get_template(name).render(**context).strip())


def bar_chart(title: str, categories: list[str], series: list[dict], cls: str, ymax: float | None = None) -> Markup:
    """Grouped vertical bars; ``series``: ``[{"name", "values": [..], "ci": [[lo, hi], ..] | None}]``
    (a value None draws no bar; a ``ci`` draws a whisker). ``<svg class="chart CLS">``, bars ``rect.bar``."""
    W, H, left, bottom, top = 640, 300, 50, 60, 30
    plot_w, plot_h = W - left - 150, H - bottom - top
    vals = [v for s in series for v in s["values"] if v is not None]
    his = [c[1] for s in series for c in (s.get("ci") or []) if c]
    ymax = ymax or max([1e-9, *vals, *his]) * 1.1
    slot = plot_w / max(1, len(categories))
    bw = slot * 0.8 / max(1, len(series))

    def y(v: float) -> float:
        return top + plot_h - plot_h * max(0.0, min(v, ymax)) / ymax

    ticks = [{"label": f"{ymax * k / 4:.2f}", "y": y(ymax * k / 4)} for k in range(5)]
    cats, bars = [], []
    for ci_, cat in enumerate(categories):
        x0 = left + ci_ * slot + slot * 0.1
        cats.append({"label": cat, "x": left + ci_ * slot + slot / 2})
        for si, s in enumerate(series):
            v = s["values"][ci_]
            if v is None:
                continue
            x = x0 + si * bw
            ci = (s.get("ci") or [None] * len(categories))[ci_]
            bars.append(
                {
                    "x": x,
                    "y": y(v),
                    "w": bw * 0.9,
                    "h": top + plot_h - y(v),
                    "colour": PALETTE[si % 8],
                    "title": f"{s['name']} {cat}: {fmt(v)}",
                    "ci": {"x": x + bw * 0.45, "lo": y(ci[0]), "hi": y(ci[1])} if ci else None,
                }
            )
    legend = [{"name": s["name"], "colour": PALETTE[si % 8], "y": top + 14 + si * 18} for si, s in enumerate(series)]
    return _render(
        "bar.svg.jinja",
        W=W,
        H=H,
        left=left,
        top=top,
        plot_w=plot_w,
        plot_h=plot_h,
        title=title,
        cls=cls,
        ticks=ticks,
        cats=cats,
        bars=bars,
        legend=legend,
    )


def _time(s: str | None) -> float | None:
    return datetime.fromisoformat(s).timestamp() if s else None


def timeline(runs: list[dict], width: int = 1000) -> Markup:
    """One row per run (``id``, ``kind``, ``status``, ``started``, ``ended``, optional ``duration_text``): a bar
    from start to end coloured by status, linking to ``/runs/ID`` (``<svg class="timeline">``)."""
    if not runs:
        return Markup("")
    t0 = min(_time(r["started"]) or 0.0 for r in runs)
    t1 = max(_time(r["ended"] or r["started"]) or 0.0 for r in runs)
    span = max(t1 - t0, 1e-3)
    left, row, top = 230, 18, 10
    plot = width - left - 10
    rows = []
    for i, r in enumerate(runs):
        s = _time(r["started"]) or t0
        e = _time(r["ended"]) or s
        rows.append(
            {
                "run": r,
                "y": top + i * row,
                "x": left + plot * (s - t0) / span,
                "w": max(3.0, plot * (e - s) / span),
                "colour": STATUS_COLOURS.get(r["status"], "#8c8c8c"),
            }
        )
    return _render(
        "timeline.svg.jinja",
        width=width,
        height=top + row * len(runs) + 24,
        left=left,
        row=row,
        rows=rows,
        start=runs[0]["started"][:19],
        span=span,
    )


def loss_curve(history: list[dict], width: int = 560, height: int = 220, small: bool = False) -> Markup:
    """Training loss per step (``step``, ``loss``) and validation loss where measured (``val_loss``) as
    polylines (``<svg class="loss-curve">``; ``small``: a 160x36 sparkline without labels)."""
    train = [(r["step"], r["loss"]) for r in history if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
    if not train:
        return Markup("")
    if small:
        width, height = 160, 36
    pad = 4 if small else 40
    steps = [s for s, _ in train + val]
    vals = [v for _, v in train + val]
    x0, x1 = min(steps), max(steps)
    lo, hi = min(vals), max(vals)
    hi = hi if hi > lo else lo + 1e-6

    def points(curve: list[tuple]) -> str:
        return " ".join(
            f"{pad + (width - 2 * pad) * ((s - x0) / (x1 - x0) if x1 > x0 else 0.5):.1f},"
            f"{pad / 2 + (height - 1.5 * pad) * (1 - (v - lo) / (hi - lo)):.1f}"
            for s, v in curve
        )

    return _render(
        "loss.svg.jinja",
        width=width,
        height=height,
        small=small,
        pad=pad,
        x0=x0,
        x1=x1,
        lo=f"{lo:.3f}",
        hi=f"{hi:.3f}",
        train=points(train),
        val=points(val) if val else "",
    )


def graph(nodes: list[dict], edges: list[dict], width: float, height: float) -> Markup:
    """A laid-out directed graph (``<svg class="lineage">``): ``nodes`` ``[{"id", "kind", "l1", "l2", "x",
    "y", "w", "h", "root", "href"}]`` (boxes with two text lines, a link when ``href``), ``edges``
    ``[{"x1", "y1", "x2", "y2"}]`` (curves with arrow heads from the right side of one box to the left of
    the next)."""
    for n in nodes:
        n["fill"] = KIND_COLOURS.get(n["kind"], "#f4f4f4")
    for e in edges:
        e["mid"] = (e["x1"] + e["x2"]) / 2
    return _render("graph.svg.jinja", width=width, height=height, nodes=nodes, edges=edges)
