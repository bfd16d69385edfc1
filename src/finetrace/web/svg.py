"""The console's SVG: the runs timeline, loss curves and the lineage graph, drawn by ``finetrace.charts``
(geometry in Python, markup in autoescaped Jinja templates); this module lays out the lineage graph.

No JavaScript: a node of the lineage graph is an ``<a>`` link to its own page.

Lineage layout: the graph (artifact -> run -> artifact) is a DAG; each node's column is its longest
path from a source (``layers``), rows are ordered by kind and label within a column, and edges are
cubic curves from the right side of a node to the left side of the next.
"""

from __future__ import annotations

from markupsafe import Markup

from .. import charts

timeline_svg = charts.timeline
loss_svg = charts.loss_curve


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
    lines = [
        {"x1": pos[a][0] + nw, "y1": pos[a][1] + nh / 2, "x2": pos[b][0], "y2": pos[b][1] + nh / 2}
        for a, b in edges
        if a in pos and b in pos
    ]
    nodes = [
        {
            "id": n,
            "kind": labels[n][0],
            "l1": labels[n][1],
            "l2": labels[n][2],
            "x": x,
            "y": y,
            "w": nw,
            "h": nh,
            "root": n == root,
            "href": hrefs.get(n),
        }
        for n, (x, y) in pos.items()
    ]
    return charts.graph(nodes, lines, width, height)
