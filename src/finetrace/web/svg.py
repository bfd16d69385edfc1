"""Server-side SVG for the console: the runs timeline, loss curves and the lineage graph.

Every label passes through ``html.escape``; the result is returned as ``Markup`` so templates embed it
as is. No JavaScript: a node of the lineage graph is an ``<a>`` link to its own page.

Lineage layout: the graph (artifact -> run -> artifact) is a DAG; each node's column is its longest
path from a source (``layers``), rows are ordered by kind and label within a column, and edges are
cubic curves from the right side of a node to the left side of the next.
"""

from __future__ import annotations

import html
from datetime import datetime

from markupsafe import Markup

STATUS_COLOURS = {"succeeded": "#55a868", "failed": "#c44e52", "running": "#4c72b0", "interrupted": "#dd8452"}
KIND_COLOURS = {"dataset": "#e3ecf7", "adapter": "#fdebd8", "base_model": "#e8f3e8", "eval_report": "#f1e6f5",
                "document": "#f5f1e1", "source": "#eeeeee", "answer": "#fff2b3", "run": "#ffffff"}


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _time(s: str | None) -> float | None:
    return datetime.fromisoformat(s).timestamp() if s else None


def timeline_svg(runs: list[dict], width: int = 1000) -> Markup:
    """One row per run: a bar from start to end coloured by status (``<svg class="timeline">``)."""
    if not runs:
        return Markup("")
    t0 = min(_time(r["started"]) for r in runs)
    t1 = max(_time(r["ended"] or r["started"]) for r in runs)
    span = max(t1 - t0, 1e-3)
    left, row, top = 230, 18, 10
    plot = width - left - 10
    h = top + row * len(runs) + 24
    out = [f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" '
           f'viewBox="0 0 {width} {h}" role="img" aria-label="runs timeline">']
    for i, r in enumerate(runs):
        y = top + i * row
        s = _time(r["started"])
        e = _time(r["ended"]) or s
        x = left + plot * (s - t0) / span
        w = max(3.0, plot * (e - s) / span)
        colour = STATUS_COLOURS.get(r["status"], "#8c8c8c")
        out.append(f'<a href="/runs/{_e(r["id"])}"><text x="{left - 6}" y="{y + 12}" text-anchor="end" '
                   f'font-size="11">{_e(r["kind"])} {_e(r["id"][-6:])}</text>'
                   f'<rect class="run-bar {_e(r["status"])}" x="{x:.1f}" y="{y + 2}" width="{w:.1f}" height="{row - 5}" '
                   f'fill="{colour}"><title>{_e(r["id"])}: {_e(r["status"])}, {_e(r.get("duration_text", ""))}'
                   f'</title></rect></a>')
    out.append(f'<text x="{left}" y="{h - 6}" font-size="10">{_e(runs[0]["started"][:19])}</text>'
               f'<text x="{width - 10}" y="{h - 6}" font-size="10" text-anchor="end">+{span:.1f} s</text></svg>')
    return Markup("".join(out))


def loss_svg(history: list[dict], width: int = 560, height: int = 220, small: bool = False) -> Markup:
    """Training loss per step (and validation loss where measured) as polylines (``class="loss-curve"``)."""
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

    def pt(s, v):
        x = pad + (width - 2 * pad) * ((s - x0) / (x1 - x0) if x1 > x0 else 0.5)
        y = pad / 2 + (height - 1.5 * pad) * (1 - (v - lo) / (hi - lo))
        return f"{x:.1f},{y:.1f}"

    out = [f'<svg class="loss-curve{" small" if small else ""}" xmlns="http://www.w3.org/2000/svg" '
           f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="loss curve">',
           f'<polyline class="train-loss" fill="none" stroke="#4c72b0" stroke-width="2" '
           f'points="{" ".join(pt(s, v) for s, v in train)}"/>']
    if val:
        out.append(f'<polyline class="val-loss" fill="none" stroke="#dd8452" stroke-width="2" '
                   f'stroke-dasharray="4 2" points="{" ".join(pt(s, v) for s, v in val)}"/>')
    if not small:
        out.append(f'<text x="{pad}" y="{height - 6}" font-size="11">step {x0}</text>'
                   f'<text x="{width - pad}" y="{height - 6}" font-size="11" text-anchor="end">step {x1}</text>'
                   f'<text x="4" y="14" font-size="11">loss {hi:.3f}</text>'
                   f'<text x="4" y="{height - 22}" font-size="11">{lo:.3f}</text>'
                   f'<text x="{width - pad}" y="14" font-size="11" text-anchor="end" fill="#4c72b0">train</text>')
        if val:
            out.append(f'<text x="{width - pad}" y="28" font-size="11" text-anchor="end" '
                       f'fill="#dd8452">validation</text>')
    out.append("</svg>")
    return Markup("".join(out))


def layers(nodes: list[str], edges: list[tuple[str, str]]) -> dict[str, int]:
    """Column of each node: its longest path from a source, then pulled right to just before its
    nearest successor (so a base model sits next to the training run that reads it, not at the far left)."""
    preds: dict[str, list[str]] = {n: [] for n in nodes}
    succs: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in edges:
        preds.setdefault(b, []).append(a)
        preds.setdefault(a, [])
        succs.setdefault(a, []).append(b)
        succs.setdefault(b, [])
    col: dict[str, int] = {}

    def depth(n: str, stack: frozenset) -> int:
        if n in col:
            return col[n]
        if n in stack:  # a cycle cannot come from the ledger; do not recurse forever on one
            return 0
        col[n] = d = max((depth(p, stack | {n}) + 1 for p in preds[n]), default=0)
        return d

    for n in preds:
        depth(n, frozenset())
    for n in sorted(col, key=lambda n: -col[n]):
        if succs[n]:
            col[n] = max(col[n], min(col[s] for s in succs[n]) - 1)
    return col


def order_columns(col: dict[str, int], edges: list[tuple[str, str]], key) -> dict[int, list[str]]:
    """Nodes per column, each column ordered by the mean row of its predecessors (fewer crossings)."""
    preds: dict[str, list[str]] = {}
    for a, b in edges:
        preds.setdefault(b, []).append(a)
    columns: dict[int, list[str]] = {}
    for n in sorted(col, key=key):
        columns.setdefault(col[n], []).append(n)
    row: dict[str, float] = {}
    for c in sorted(columns):
        def bary(n: str) -> float:
            rows = [row[p] for p in preds.get(n, []) if p in row]
            return sum(rows) / len(rows) if rows else float("inf")

        columns[c].sort(key=lambda n: (bary(n), key(n)))
        row.update({n: i for i, n in enumerate(columns[c])})
    return columns


def lineage_svg(graph: dict, root: str, hrefs: dict[str, str]) -> Markup:
    """The lineage graph (``ledger.lineage`` shape, plus optional ``answers``) as a clickable SVG.

    ``hrefs`` maps a node id to its page; the root node gets ``class="node root"``.
    """
    labels: dict[str, tuple[str, str, str]] = {}  # id -> (kind, line 1, line 2)
    for d, a in graph["artifacts"].items():
        ref = a["ref"] if a["ref"] != d else d[:19] + "…"
        labels[d] = (a["kind"], a["kind"].replace("_", " "), ref)
    for rid, r in graph["runs"].items():
        labels[rid] = ("run", f"{r['kind']} run · {r['status']}", rid[-22:])
    for pid in graph.get("answers", {}):
        labels[pid] = ("answer", "answer", pid[:22])
    edges = [tuple(e) for e in graph["edges"]]
    col = {n: c for n, c in layers(list(labels), edges).items() if n in labels}
    columns = order_columns(col, edges, key=lambda n: (labels[n][0], labels[n][2]))
    nw, nh, gx, gy, pad = 180, 42, 46, 18, 12
    pos = {n: (pad + c * (nw + gx), pad + i * (nh + gy)) for c, ns in columns.items() for i, n in enumerate(ns)}
    width = pad * 2 + (max(columns) + 1) * (nw + gx) - gx if columns else 100
    height = pad * 2 + max(len(ns) for ns in columns.values()) * (nh + gy) - gy if columns else 60
    out = [f'<svg class="lineage" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="lineage graph">'
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#666"/></marker></defs>']
    for a, b in edges:
        if a not in pos or b not in pos:
            continue
        (ax, ay), (bx, by) = pos[a], pos[b]
        x1, y1, x2, y2 = ax + nw, ay + nh / 2, bx, by + nh / 2
        mid = (x1 + x2) / 2
        out.append(f'<path class="edge" d="M {x1} {y1} C {mid} {y1}, {mid} {y2}, {x2} {y2}" fill="none" '
                   f'stroke="#666" marker-end="url(#arrow)"/>')
    for n, (x, y) in pos.items():
        kind, l1, l2 = labels[n]
        cls = "node root" if n == root else "node"
        shape = (f'<rect x="{x}" y="{y}" width="{nw}" height="{nh}" rx="{16 if kind == "run" else 3}" '
                 f'fill="{KIND_COLOURS.get(kind, "#f4f4f4")}" stroke="{"#c44e52" if n == root else "#555"}" '
                 f'stroke-width="{3 if n == root else 1}"/>')
        text = (f'<text x="{x + 8}" y="{y + 16}" font-size="11" font-weight="bold">{_e(l1)}</text>'
                f'<text x="{x + 8}" y="{y + 32}" font-size="11">{_e(l2)}</text>')
        inner = f'<g class="{cls}" data-id="{_e(n)}" data-kind="{_e(kind)}">{shape}{text}<title>{_e(n)}</title></g>'
        href = hrefs.get(n)
        out.append(f'<a href="{_e(href)}">{inner}</a>' if href else inner)
    out.append("</svg>")
    return Markup("".join(out))
