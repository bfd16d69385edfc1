"""Lineage queries: what an artifact was made from (upstream) and what was made from it (downstream).

The graph is bipartite: artifact --input--> run --output--> artifact. Both directions are walked
breadth-first over the index; the result is plain data (for ``--json``) with a tree rendering for text.
"""

from __future__ import annotations

from collections import deque

from ..errors import NotFoundError
from .log import Ledger


# duplicates: alike within on purpose (the upstream and downstream walks are mirror images, each readable on its own).
def lineage(ledger: Ledger, digest: str, direction: str = "both", depth: int = 50) -> dict:
    """Return ``{"root", "artifacts": {digest: ...}, "runs": {id: ...}, "edges": [[src, dst], ...]}``.

    ``direction`` is ``up`` (sources), ``down`` (derivatives) or ``both``.
    """
    artifacts: dict[str, dict] = {}
    runs: dict[str, dict] = {}
    edges: set[tuple[str, str]] = set()

    def add_artifact(d: str) -> None:
        if d not in artifacts:
            try:
                a = ledger.artifact(d)
                artifacts[d] = {"kind": a.kind, "ref": a.ref, "aliases": a.aliases}
            except NotFoundError:
                artifacts[d] = {"kind": "unrecorded", "ref": d, "aliases": []}

    def add_run(rid: str) -> dict:
        if rid not in runs:
            r = ledger.get_run(rid)
            runs[rid] = {
                "kind": r.kind,
                "status": r.status,
                "started": r.started,
                "actor": r.actor,
                "inputs": r.inputs,
                "outputs": r.outputs,
            }
        return runs[rid]

    add_artifact(digest)
    # The upward walk (producer runs, their inputs) and the downward walk below (consumer runs, their
    # outputs) are deliberate mirror images of each other; each is kept readable on its own.
    if direction in ("up", "both"):
        queue, seen = deque([(digest, 0)]), {digest}
        while queue:
            d, lvl = queue.popleft()
            rid = ledger.producer(d)
            if not rid or lvl >= depth:
                continue
            r = add_run(rid)
            edges.add((rid, d))
            for i in r["inputs"]:
                add_artifact(i)
                edges.add((i, rid))
                if i not in seen:
                    seen.add(i)
                    queue.append((i, lvl + 1))
    if direction in ("down", "both"):
        queue, seen = deque([(digest, 0)]), {digest}
        while queue:
            d, lvl = queue.popleft()
            if lvl >= depth:
                continue
            for rid in ledger.consumers(d):
                r = add_run(rid)
                edges.add((d, rid))
                for o in r["outputs"]:
                    add_artifact(o)
                    edges.add((rid, o))
                    if o not in seen:
                        seen.add(o)
                        queue.append((o, lvl + 1))
    return {"root": digest, "artifacts": artifacts, "runs": runs, "edges": sorted(map(list, edges))}


def render_tree(graph: dict, direction: str = "up") -> list[str]:
    """Indented text lines of the upstream (or downstream) tree from the root artifact."""
    from ..canonical import short

    children: dict[str, list[str]] = {}
    for src, dst in graph["edges"]:
        if direction == "up":
            children.setdefault(dst, []).append(src)
        else:
            children.setdefault(src, []).append(dst)
    lines: list[str] = []

    def label(node: str) -> str:
        if node in graph["artifacts"]:
            a = graph["artifacts"][node]
            ref = a["ref"] if a["ref"] != node else short(node)
            return f"{a['kind']} {ref} ({short(node)})"
        r = graph["runs"][node]
        return f"run {node} [{r['kind']}, {r['status']}]"

    def walk(node: str, indent: str, seen: set) -> None:
        for child in sorted(children.get(node, [])):
            lines.append(f"{indent}{'<- ' if direction == 'up' else '-> '}{label(child)}")
            if child not in seen:
                walk(child, indent + "   ", seen | {child})

    lines.append(label(graph["root"]))
    walk(graph["root"], "  ", {graph["root"]})
    return lines
