"""Stage caching by digest, as a build system would, with the cache recorded in the ledger itself.

A stage's **cache key** is the SHA-256 of the canonical JSON of its resolved config and the digests of
its inputs (upstream artifacts, or the bytes of the files it reads). Each stage of a pipeline run appends
a ``pipeline.stage`` event (inside the ``pipeline`` run) carrying the key::

    {"run_id": <pipeline run>, "stage": "train", "cache_key": "sha256:...", "status": "ran" | "cached" |
     "started" | "failed", "stage_runs": [...], "outputs": {...}, "metrics": {...}, "seconds": 1.2}

A later stage whose key matches an event with status ``ran`` (its outputs still recorded) is skipped and
those outputs reused. A ``started`` event with no later ``ran`` for the same key means the stage was
interrupted: the train stage then resumes from its checkpoint. Because the cache is ledger events, it
is covered by the Merkle log and ``finetrace verify`` like everything else, and never goes stale
silently: deleting the workspace deletes the cache.
"""

from __future__ import annotations

from pathlib import Path

from ..canonical import canonical_json, sha256_bytes, sha256_file
from ..errors import NotFoundError
from ..store import folder_digest
from ..workspace import Workspace

EVENT = "pipeline.stage"
KEY_FORMAT = 1


def cache_key(stage: str, config: dict, inputs: dict[str, str]) -> str:
    """The key of one stage: its resolved config and its inputs' digests (name -> digest)."""
    return sha256_bytes(canonical_json({"format": KEY_FORMAT, "stage": stage, "config": config, "inputs": inputs}))


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes, or a folder's digest (``store.folder_digest``, the one rule).

    Until 2026-12 a folder was hashed by a scheme of its own; cache keys are only compared, never
    re-verified, so a key recorded under the old scheme simply misses once and the stage runs again."""
    return folder_digest(path) if path.is_dir() else sha256_file(path)


def _outputs_exist(ws: Workspace, outputs: dict) -> bool:
    for digest in outputs.get("artifacts", []):
        try:
            ws.ledger.artifact(digest)
        except NotFoundError:
            return False
        if not ws.store.has(digest):
            return False
    return True


def lookup(ws: Workspace, stage: str, key: str) -> dict | None:
    """The newest ``ran`` event for this stage and key whose outputs are still recorded, else None."""
    best = None
    for e in ws.ledger.entries(type=EVENT):
        d = e.data
        if d.get("stage") == stage and d.get("cache_key") == key and d.get("status") == "ran":
            best = d
    if best is not None and _outputs_exist(ws, best.get("outputs", {})):
        return best
    return None


def was_interrupted(ws: Workspace, stage: str, key: str) -> bool:
    """True when the last event for this stage and key is ``started`` (the stage never finished)."""
    last = None
    for e in ws.ledger.entries(type=EVENT):
        d = e.data
        if d.get("stage") == stage and d.get("cache_key") == key:
            last = d.get("status")
    return last == "started"


def stage_events(ws: Workspace, pipeline_run: str) -> list[dict]:
    """The finished stage events (ran, cached, failed) of one pipeline run, in order."""
    return [
        e.data
        for e in ws.ledger.entries(type=EVENT)
        if e.data.get("run_id") == pipeline_run and e.data.get("status") != "started"
    ]
