"""What the ledger and store record about one adapter: the one query below audit facts and market packages.

``adapter_record(ws, digest)`` follows the adapter to its ``finetrace_adapter.json``, base model, producing
run, that run's dataset inputs, the parent chain, and the eval reports made of it. ``audit/facts.py``
adds the documents' detail on top; ``market/client.py`` builds a package manifest from it. An artifact
the ledger does not hold is reported as absent (None, or left out); a stored file that fails its
re-hash is an IntegrityError, never absence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import NotFoundError
from .log import Artifact, Run


@dataclass
class AdapterRecord:
    """The recorded facts of one adapter (artifacts and runs as the ledger holds them)."""

    adapter: Artifact
    meta: dict  # finetrace_adapter.json of the adapter folder ({} when absent)
    base_digest: str | None  # from the artifact's metadata, else from finetrace_adapter.json
    base: Artifact | None  # None: no base named, or the ledger does not record it
    run: Run | None  # the producing run
    datasets: list[Artifact] = field(default_factory=list)  # dataset artifacts among the run's inputs
    parents: list[Artifact | str] = field(default_factory=list)  # parent chain; a digest when unrecorded
    eval_reports: list[Artifact] = field(default_factory=list)  # outputs of evaluate runs of the adapter


def recorded(ledger, digest: str | None) -> Artifact | None:
    """The artifact, or None when the ledger does not record it (the one "not found" of these queries)."""
    if not digest:
        return None
    try:
        return ledger.artifact(digest)
    except NotFoundError:
        return None


def adapter_record(ws, digest: str) -> AdapterRecord:
    """Gather the :class:`AdapterRecord` of adapter ``digest`` (NotFoundError if it is not recorded)."""
    led = ws.ledger
    art = led.artifact(digest)
    meta = ws.store.member_json(art.digest, "finetrace_adapter.json") or {}
    base_digest = (art.metadata or {}).get("base_model") or meta.get("base_model")
    run = led.get_run(art.run_id) if art.run_id else None
    datasets = [a for a in (recorded(led, d) for d in (run.inputs if run else [])) if a and a.kind == "dataset"]
    parents: list[Artifact | str] = []
    seen = {art.digest}
    p = (art.metadata or {}).get("parent")
    while p and p not in seen:
        seen.add(p)
        pa = recorded(led, p)
        parents.append(pa if pa is not None else p)
        p = (pa.metadata or {}).get("parent") if pa is not None else None
    reports = []
    for rid in led.consumers(art.digest):
        r = led.get_run(rid)
        if r.kind == "evaluate":
            reports += [a for a in (led.artifact(o) for o in r.outputs) if a.kind == "eval_report"]
    return AdapterRecord(art, meta, base_digest, recorded(led, base_digest), run, datasets, parents, reports)
