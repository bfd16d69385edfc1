"""What each console page shows, gathered from the workspace: plain data for the templates.

Read-only: nothing here appends to the ledger or writes objects (files are read through
``ObjectStore.read_bytes``, which re-hashes them; folders are listed from their verified manifests).
The rules (clearance, lineage, provenance, verify) are the ledger's and the stages' own functions;
this module only arranges their answers for a page.
"""

from __future__ import annotations

import json
from datetime import datetime

from ..errors import NotFoundError
from ..evaluate.schema import EvalReport
from ..ledger import lineage
from ..ledger.clearance import clearance
from ..tracking import step_history
from ..workspace import Workspace

TEXT_SUFFIXES = (".md", ".json", ".jsonl", ".yaml", ".yml", ".txt", ".csv", ".html", ".py", ".jinja")
MAX_FILE_BYTES = 2_000_000


def duration_s(run) -> float | None:
    if not run.ended:
        return None
    return (datetime.fromisoformat(run.ended) - datetime.fromisoformat(run.started)).total_seconds()


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "running"
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def key_metrics(metrics: dict | None, limit: int = 4) -> list[tuple[str, object]]:
    """The first few scalar metrics of a run, in a stable order (loss and accuracy first)."""
    items = [
        (k, v)
        for k, v in sorted((metrics or {}).items())
        if isinstance(v, (int, float)) and v is not None and not isinstance(v, bool)
    ]
    first = [kv for kv in items if any(w in kv[0] for w in ("loss", "accuracy", "f1"))]
    return (first + [kv for kv in items if kv not in first])[:limit]


def runs_timeline(ws: Workspace, kind: str | None = None) -> list[dict]:
    out = []
    for r in ws.ledger.runs(kind or None):
        d = duration_s(r)
        outs = []
        for digest in r.outputs:
            a = ws.ledger.artifact(digest)
            outs.append({"digest": digest, "ref": a.ref, "kind": a.kind})
        out.append(
            {
                "id": r.id,
                "kind": r.kind,
                "status": r.status,
                "actor": r.actor,
                "started": r.started,
                "ended": r.ended,
                "duration": d,
                "duration_text": human_duration(d),
                "metrics": key_metrics(r.metrics),
                "outputs": outs,
                "error": r.error,
                "history": step_history(ws, r) if r.kind == "train" else [],
            }
        )
    return out


def run_view(ws: Workspace, run_id: str) -> dict:
    r = ws.ledger.get_run(run_id)
    arts = {d: ws.ledger.artifact(d) for d in r.inputs + r.outputs if ws.ledger.has_artifact(d)}
    return {
        "run": r,
        "duration_text": human_duration(duration_s(r)),
        "artifacts": arts,
        "history": step_history(ws, r),
        "config": json.dumps(r.config, indent=2, sort_keys=True),
        "environment": json.dumps(r.environment, indent=2, sort_keys=True),
        "metrics": sorted((r.metrics or {}).items()),
    }


def alias_history(ws: Workspace, names: list[str]) -> list[dict]:
    """Every version of each name, oldest first: ``{name, version, digest, seq, time}``."""
    out = []
    for name in names:
        for n, v, d, seq in ws.ledger.conn.execute(
            "SELECT name, version, digest, seq FROM aliases WHERE name=? ORDER BY version", (name,)
        ):
            out.append({"name": n, "version": v, "digest": d, "seq": seq, "time": ws.ledger.entry(seq).time})
    return out


def files_of(ws: Workspace, digest: str) -> list[dict]:
    """The files of a folder artifact (path, size, digest), or one entry for a single file."""
    if ws.store.is_tree(digest):
        return [{"path": e.path, "size": e.size, "digest": e.digest} for e in ws.store.tree(digest)]
    return [{"path": "(file)", "size": ws.store.path(digest).stat().st_size, "digest": digest}]


def read_file(ws: Workspace, digest: str, path: str) -> tuple[str, bytes]:
    """(path, verified bytes) of one file of a folder artifact."""
    entry = next((e for e in ws.store.tree(digest) if e.path == path), None)
    if entry is None:
        raise NotFoundError(f"{digest} has no file {path!r}")
    if entry.size > MAX_FILE_BYTES:
        raise NotFoundError(
            f"{path} is {entry.size} bytes; the console shows files up to {MAX_FILE_BYTES}",
            hint="materialise it with `finetrace show` and read it from the workspace",
        )
    return entry.path, ws.store.read_bytes(entry.digest)


def artifact_view(ws: Workspace, ref: str) -> dict:
    a = ws.ledger.resolve(ref)
    names = sorted({al.rsplit("@", 1)[0] for al in a.aliases})
    view = {
        "artifact": a,
        "aliases": alias_history(ws, names),
        "files": files_of(ws, a.digest),
        "producer": ws.ledger.get_run(a.run_id) if a.run_id else None,
        "consumers": [ws.ledger.get_run(rid) for rid in ws.ledger.consumers(a.digest)],
        "metadata": json.dumps(a.metadata, indent=2, sort_keys=True),
        "clearance": None,
        "approvals": [],
        "datasheet": None,
        "report": None,
    }
    if a.kind in ("adapter", "model"):
        view["clearance"] = clearance(ws.ledger, a.digest)
        view["approvals"] = [e for e in ws.ledger.entries(type="approval") if e.data.get("adapter") == a.digest]
    if a.kind == "dataset" and any(f["path"] == "datasheet.json" for f in view["files"]):
        view["datasheet"] = json.loads(read_file(ws, a.digest, "datasheet.json")[1])
    if a.kind == "eval_report" and any(f["path"] == "report.json" for f in view["files"]):
        view["report"] = EvalReport.parse(
            json.loads(read_file(ws, a.digest, "report.json")[1]), source=f"{a.ref}/report.json"
        ).to_dict()
    return view


def artifacts_by_kind(ws: Workspace) -> dict[str, list]:
    out: dict[str, list] = {}
    for a in ws.ledger.artifacts():
        out.setdefault(a.kind, []).append(a)
    return out


def lineage_view(ws: Workspace, ref: str) -> dict:
    """Upstream and downstream of an artifact, or of a served answer (an ``ftp-`` provenance id)."""
    if ref.startswith("ftp-"):
        return answer_lineage(ws, ref)
    a = ws.ledger.resolve(ref)
    return {"root": a.digest, "title": f"{a.kind} {a.ref}", "graph": lineage(ws.ledger, a.digest, "both")}


def answer_lineage(ws: Workspace, provenance_id: str) -> dict:
    """The answer, the deployment that served it, and everything upstream of what that deployment read."""
    from ..serve.provenance import find_request

    req = find_request(ws, provenance_id).data
    graph = {"artifacts": {}, "runs": {}, "edges": [], "answers": {provenance_id: req}}
    edges: set[tuple[str, str]] = set()
    sources = [d for d in (req.get("adapter"), req.get("base_model")) if d]
    if req.get("deployment"):
        dep = ws.ledger.get_run(req["deployment"])
        graph["runs"][dep.id] = {"kind": dep.kind, "status": dep.status}
        edges.add((dep.id, provenance_id))
        sources = list(dict.fromkeys(dep.inputs + sources))
        edges |= {(d, dep.id) for d in sources}
    else:
        edges |= {(d, provenance_id) for d in sources}
    for d in sources:
        if not ws.ledger.has_artifact(d):
            continue
        up = lineage(ws.ledger, d, "up")
        graph["artifacts"].update(up["artifacts"])
        graph["runs"].update(up["runs"])
        edges |= {tuple(e) for e in up["edges"]}
    graph["edges"] = sorted(map(list, edges))
    return {"root": provenance_id, "title": f"answer {provenance_id}", "graph": graph}


def hrefs_for(graph: dict) -> dict[str, str]:
    out = {d: f"/a/{d}" for d in graph["artifacts"] if graph["artifacts"][d]["kind"] != "unrecorded"}
    out.update({rid: f"/runs/{rid}" for rid in graph["runs"]})
    out.update({pid: f"/provenance?id={pid}" for pid in graph.get("answers", {})})
    return out


def eval_reports(ws: Workspace) -> list[dict]:
    out = []
    for a in reversed(ws.ledger.artifacts("eval_report")):
        md = a.metadata or {}
        out.append({"artifact": a, "passed": md.get("passed") or {}, "metrics": md.get("metrics") or {}})
    return out


def documents(ws: Workspace) -> list[dict]:
    return [
        {
            "artifact": a,
            "files": [f for f in files_of(ws, a.digest) if f["path"].endswith((".md", ".json", ".html", ".pdf"))],
        }
        for a in reversed(ws.ledger.artifacts("document"))
    ]


def needs_person(ws: Workspace) -> dict:
    """Adapters awaiting approval, failed gates, overrides and erasures, newest first.

    An adapter awaits approval when no ``approval`` covers the eval report behind its current clearance
    (a newer evaluation needs a new approval); an adapter whose gates failed is listed as failed instead.
    """
    approvals = [e.data for e in ws.ledger.entries(type="approval")]
    awaiting, failed = [], []
    for a in ws.ledger.artifacts("adapter") + ws.ledger.artifacts("model"):
        c = clearance(ws.ledger, a.digest)
        covered = [
            ap
            for ap in approvals
            if ap.get("adapter") == a.digest and (c.report is None or ap.get("report") == c.report)
        ]
        if c.status == "failed":
            failed.append({"artifact": a, "clearance": c})
        elif not covered:
            awaiting.append(
                {
                    "artifact": a,
                    "clearance": c,
                    "approved_before": any(ap.get("adapter") == a.digest for ap in approvals),
                }
            )
    overrides = [e for e in ws.ledger.entries(type="gate.override")]
    erasures = [e for e in ws.ledger.entries() if "erase" in e.type or "erasure" in e.type]
    erasure_runs = [r for r in ws.ledger.runs() if "eras" in r.kind or (r.config or {}).get("erase")]
    return {
        "awaiting": awaiting[::-1],
        "failed": failed[::-1],
        "overrides": overrides[::-1],
        "erasures": erasures[::-1],
        "erasure_runs": erasure_runs[::-1],
    }


def ledger_state(ws: Workspace) -> dict:
    led = ws.ledger
    cps = led.checkpoints()
    witness = json.loads(led.witness.read_text()) if led.witness.is_file() else None
    types: dict[str, int] = {}
    for t, n in led.conn.execute("SELECT type, COUNT(*) FROM entries GROUP BY type ORDER BY type"):
        types[t] = n
    return {
        "size": led.size(),
        "root": led.root().hex(),
        "checkpoint": cps[-1] if cps else None,
        "checkpoints": len(cps),
        "witness": witness,
        "types": types,
        "root_path": str(ws.root),
    }
