"""The ledger (core): a Merkle log of every run and artifact, signed checkpoints, lineage, verify."""

from .lineage import lineage
from .log import Artifact, Checkpoint, Entry, Ledger, Run, RunRecorder
from .verify import VerifyReport, verify_workspace

# duplicates: alike ledger/log.py:__all__ on purpose (the package re-exports the names of ledger.log).
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
