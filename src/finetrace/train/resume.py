"""What ``--resume`` continues from, decided before any work: a recorded adapter, a checkpoint, or nothing.

A run can be killed at any point, so ``train(..., resume=True)`` looks in this order:

1. a train run of the same config (cadence keys aside) that already recorded its output: the run got
   past the end of training (it may have been killed after recording, before cleaning up), so that
   adapter is the answer and nothing is trained again;
2. the newest complete checkpoint of the config: training continues from it, exactly;
3. nothing (killed before the first checkpoint): training starts fresh, and a ``ResumeWarning`` says so.

A corrupt checkpoint or one from another config is still an ``IntegrityError``, never a fresh start.
"""

from __future__ import annotations

import warnings

from ..ledger import Artifact
from ..workspace import Workspace
from .checkpoint import Checkpointer


class ResumeWarning(UserWarning):
    """What ``--resume`` found (shown by the CLI as a note)."""


def recorded_output(ws: Workspace, digest: str) -> tuple[Artifact, str] | None:
    """(artifact, run id) of the newest train run of config digest ``digest`` that recorded an output."""
    from .loop import config_digest

    for run in reversed(ws.ledger.runs("train")):
        if run.outputs and run.status != "failed" and config_digest(run.config) == digest:
            return ws.ledger.artifact(run.outputs[-1]), run.id
    return None


def resume_point(ws: Workspace, ckpt: Checkpointer) -> tuple[Artifact | None, dict | None]:
    """(recorded artifact, None), (None, loaded checkpoint) or (None, None) for a fresh start."""
    done = recorded_output(ws, ckpt.config_digest)
    if done is not None:
        art, run_id = done
        warnings.warn(
            f"nothing to resume: run {run_id} of this config already recorded {art.kind} {art.ref}",
            ResumeWarning,
            stacklevel=3,
        )
        return art, None
    if ckpt.latest() is None:
        warnings.warn(
            f"no complete checkpoint in {ckpt.folder} (killed before the first one): starting fresh",
            ResumeWarning,
            stacklevel=3,
        )
        return None, None
    return None, ckpt.load()


def made_by(ws: Workspace, art: Artifact) -> str:
    """The newest train run that output ``art`` (a digest made again by a later run names that run)."""
    for run in reversed(ws.ledger.runs("train")):
        if art.digest in run.outputs and run.status != "failed":
            return run.id
    return art.run_id
