"""The ledger's record types: ``Entry`` (one log entry), ``Checkpoint`` (a signed tree head),
``Artifact`` and ``Run`` (rows of the derived index), the artifact and run kinds, and ``now``/``actor``.

Re-exported by ``finetrace.ledger.log`` (and the public ones by ``finetrace.ledger``).
"""

from __future__ import annotations

import getpass
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ..canonical import canonical_json

ARTIFACT_KINDS = (
    "source",
    "dataset",
    "base_model",
    "adapter",
    "eval_report",
    "document",
    "bundle",
    "checkpoint",
    "model",
)
RUN_KINDS = (
    "import",
    "convert",
    "train",
    "evaluate",
    "document",
    "approve",
    "publish",
    "pull",
    "deploy",
    "reproduce",
    "export",
    "pipeline",
    "parity",
    "erasure",
)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def actor() -> str:
    return os.environ.get("FINETRACE_ACTOR") or getpass.getuser()


@dataclass(frozen=True)
class Entry:
    seq: int
    type: str
    time: str
    actor: str
    data: dict
    leaf: bytes

    @classmethod
    def from_row(cls, seq: int, leaf: bytes, body: bytes) -> Entry:
        doc = json.loads(body)
        return cls(seq, doc["type"], doc["time"], doc["actor"], doc["data"], leaf)


@dataclass(frozen=True)
class Checkpoint:
    size: int
    root: str  # hex
    time: str
    key_id: str
    signature: str

    def message(self) -> bytes:
        """The exact bytes that are signed."""
        return canonical_json(
            {
                "format": "finetrace-checkpoint/1",
                "size": self.size,
                "root": self.root,
                "time": self.time,
                "key_id": self.key_id,
            }
        )

    # duplicates: alike ledger/verify.py:to_dict on purpose (to_dict of a record type).
    # duplicates: alike serve/parity.py:to_dict on purpose (to_dict of a record type).
    # duplicates: alike within on purpose (to_dict of a record type).
    def to_dict(self) -> dict:
        return {
            "size": self.size,
            "root": self.root,
            "time": self.time,
            "key_id": self.key_id,
            "signature": self.signature,
        }


@dataclass
class Artifact:
    digest: str
    kind: str
    metadata: dict
    run_id: str | None
    created: str
    aliases: list[str] = field(default_factory=list)  # "name@version", oldest first

    @property
    def ref(self) -> str:
        """The most recent ``name@version`` of this artifact, else its digest."""
        return self.aliases[-1] if self.aliases else self.digest

    @property
    def name(self) -> str | None:
        return self.aliases[-1].rsplit("@", 1)[0] if self.aliases else None

    @property
    def version(self) -> int | None:
        return int(self.aliases[-1].rsplit("@", 1)[1]) if self.aliases else None

    # duplicates: alike within on purpose (to_dict of a record type).
    def to_dict(self) -> dict:
        return {
            "digest": self.digest,
            "kind": self.kind,
            "aliases": self.aliases,
            "metadata": self.metadata,
            "run_id": self.run_id,
            "created": self.created,
        }


@dataclass
class Run:
    id: str
    kind: str
    status: str
    actor: str | None
    config: dict
    environment: dict
    metrics: dict | None
    error: str | None
    started: str
    ended: str | None
    inputs: list[str]
    outputs: list[str]

    def to_dict(self) -> dict:
        return dict(self.__dict__)
