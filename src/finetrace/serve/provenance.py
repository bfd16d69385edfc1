"""Resolving a provenance id: the served answer -> deployment, adapter, training run, data, eval, approvals.

Every answer's ``provenance_id`` names one ``serve.request`` ledger event. From it the ledger gives:

    request       the event itself (time, model, digests of input and output, token counts, latency)
    deployment    the `deploy` run that served it (base + adapters, settings, status)
    base_model    the base artifact
    adapter       the adapter artifact (None for the bare base)
    training_run  the run that produced the adapter (config, environment, seed, inputs)
    datasets      the dataset artifacts among that run's inputs, each with its datasheet.json
    evaluation    the gate clearance, every `gate.verdict` for the adapter and its eval report artifacts
    approvals     `approval` and `gate.override` events naming the adapter
    lineage       the full upstream lineage graph of the adapter

All of it is covered by the ledger's Merkle root, so ``finetrace verify`` vouches for the answer.
"""

from __future__ import annotations

from ..errors import NotFoundError
from ..ledger import lineage
from ..ledger.clearance import clearance
from ..workspace import Workspace
from .requestlog import EVENT


def find_request(ws: Workspace, provenance_id: str):
    for e in ws.ledger.entries(type=EVENT):
        if e.data.get("provenance_id") == provenance_id:
            return e
    raise NotFoundError(
        f"no served answer with provenance id {provenance_id!r} in this workspace",
        hint="check the id, and that you are in the workspace the server used (--workspace)",
    )


def _artifact(ws: Workspace, digest: str | None) -> dict | None:
    if not digest:
        return None
    try:
        return ws.ledger.artifact(digest).to_dict()
    except NotFoundError:
        return {"digest": digest, "kind": "unrecorded"}


def _datasheet(ws: Workspace, digest: str) -> dict | None:
    """The dataset's datasheet.json, re-hashed now. None only when there is none (or the dataset's objects
    were purged by an erasure); a datasheet that fails its integrity check raises IntegrityError."""
    return ws.store.member_json(digest, "datasheet.json")


def _mentions(data: dict, digest: str) -> bool:
    return digest in (data.get("adapter"), data.get("artifact"), data.get("digest"), data.get("subject"))


def resolve(ws: Workspace, provenance_id: str) -> dict:
    """The provenance document of one served answer (plain JSON-able data)."""
    entry = find_request(ws, provenance_id)
    req = entry.data
    out: dict = {"provenance_id": provenance_id, "ledger_seq": entry.seq, "time": entry.time, "request": req}
    out["deployment"] = ws.ledger.get_run(req["deployment"]).to_dict() if req.get("deployment") else None
    out["base_model"] = _artifact(ws, req.get("base_model"))
    adapter = req.get("adapter")
    out["adapter"] = _artifact(ws, adapter)
    out["training_run"], out["datasets"], out["evaluation"], out["approvals"] = None, [], None, []
    if adapter:
        art = ws.ledger.artifact(adapter)
        if art.run_id:
            run = ws.ledger.get_run(art.run_id)
            out["training_run"] = run.to_dict()
            for d in run.inputs:
                a = _artifact(ws, d)
                if a and a.get("kind") == "dataset":
                    out["datasets"].append({**a, "datasheet": _datasheet(ws, d)})
        clear = clearance(ws.ledger, adapter)
        verdicts = [
            {"seq": e.seq, "time": e.time, **e.data}
            for e in ws.ledger.entries(type="gate.verdict")
            if e.data.get("adapter") == adapter
        ]
        reports = [_artifact(ws, v["report"]) for v in verdicts if v.get("report")]
        out["evaluation"] = {
            "status": clear.status,
            "detail": clear.detail,
            "report": clear.report,
            "verdicts": verdicts,
            "reports": reports,
        }
        for kind in ("approval", "gate.override"):
            out["approvals"] += [
                {"type": kind, "seq": e.seq, "time": e.time, "actor": e.actor, **e.data}
                for e in ws.ledger.entries(type=kind)
                if _mentions(e.data, adapter)
            ]
        out["lineage"] = lineage(ws.ledger, adapter, "up")
        from .parity import latest_parity

        par = latest_parity(ws, adapter)
        out["parity"] = (
            {k: par[k] for k in ("agreement", "agreeing", "n", "exact", "engine", "report", "run_id")} if par else None
        )
    return out


def render(doc: dict) -> list[str]:
    """Human-readable lines for ``finetrace provenance ID``."""
    r = doc["request"]
    lines = [
        f"answer      {doc['provenance_id']} (ledger entry {doc['ledger_seq']}, {doc['time']})",
        f"model       {r['model']}  tokens in/out {r['prompt_tokens']}/{r['completion_tokens']}  "
        f"latency {r['latency_ms']} ms",
        f"input       {r['input_sha256']}",
        f"output      {r['output_sha256']}",
    ]
    if doc.get("deployment"):
        d = doc["deployment"]
        lines.append(f"deployment  {d['id']} [{d['status']}] started {d['started']}")
        eng = (d.get("config") or {}).get("engine") or {"name": "native"}
        lines.append(f"engine      {eng['name']} {eng.get('version') or ''} {eng.get('mode') or ''}".rstrip())
    b = doc.get("base_model") or {}
    lines.append(f"base model  {(b.get('aliases') or [b.get('digest')])[-1]} {b.get('digest')}")
    if doc.get("adapter"):
        a = doc["adapter"]
        lines.append(f"adapter     {(a.get('aliases') or [a['digest']])[-1]} {a['digest']}")
    if doc.get("training_run"):
        t = doc["training_run"]
        lines.append(f"trained by  run {t['id']} [{t['status']}] {t['started']}")
    for ds in doc.get("datasets", []):
        sheet = "datasheet" if ds.get("datasheet") else "no datasheet"
        lines.append(f"dataset     {(ds.get('aliases') or [ds['digest']])[-1]} {ds['digest']} ({sheet})")
    if doc.get("evaluation"):
        ev = doc["evaluation"]
        lines.append(
            f"evaluation  {ev['status']}: {ev['detail']}" + (f" report {ev['report']}" if ev["report"] else "")
        )
    if doc.get("parity"):
        p = doc["parity"]
        lines.append(
            f"parity      {p['agreeing']}/{p['n']} served answers equal the evaluated ones "
            f"({'token-exact' if p['exact'] else format(p['agreement'], '.1%')}, {p['engine']}, run {p['run_id']})"
        )
    elif doc.get("adapter"):
        lines.append("parity      not checked (`finetrace parity ADAPTER`)")
    for ap in doc.get("approvals", []):
        lines.append(f"approval    {ap['type']} by {ap.get('by') or ap['actor']} at {ap['time']}")
    return lines
