"""The ledger (core): a Merkle log of every run and artifact, signed checkpoints, lineage, verify."""

from .lineage import lineage
from .log import Artifact, Checkpoint, Entry, Ledger, Run, RunRecorder
from .verify import VerifyReport, verify_workspace

__all__ = [
    "Artifact",
    "Checkpoint",
    "Entry",
    "Ledger",
    "Run",
    "RunRecorder",
    "VerifyReport",
    "lineage",
    "verify_workspace",
]
