"""A workspace: one folder holding the ledger, the object store and the signing key.

    <workspace>/
      ledger.db        SQLite (WAL): the Merkle log + its index
      witness.json     the latest signed checkpoint (a copy; the external witness is outside, see
                       ledger/witness.py, and `finetrace checkpoint --export` writes one for an auditor)
      objects/         content-addressed store (objects/sha256/ab/cdef…)
      keys/            workspace.key (Ed25519, 0600) and workspace.pub
      cache/           derived, deletable: materialised folders, converted models
      workspace.json   format version, creation time, optional "witness" path
      reports/         copies of reports and documents for people; `finetrace verify` checks them

Which workspace: an explicit path, else ``$FINETRACE_WORKSPACE``, else ``./.finetrace``.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from . import debris
from .atomic import write_text
from .errors import WorkspaceError
from .ledger.log import Ledger, now
from .ledger.signing import KeyPair, public_to_b64
from .ledger.witness import witness_path
from .store import ObjectStore

FORMAT = "finetrace-workspace/1"
DEFAULT = ".finetrace"


def resolve_path(path: str | Path | None = None) -> Path:
    if path:
        return Path(path).expanduser().resolve()
    env = os.environ.get("FINETRACE_WORKSPACE")
    return Path(env).expanduser().resolve() if env else (Path.cwd() / DEFAULT).resolve()


class Workspace:
    def __init__(self, root: Path):
        self.root = root
        self.store = ObjectStore(root / "objects", root / "cache" / "trees")
        self._keys: KeyPair | None = None
        self.ledger = Ledger(root / "ledger.db", None)
        self.ledger.key_loader = lambda: self.keys  # runs seal themselves: the key loads on first need
        self.settings: dict = {}

    # -- lifecycle ----------------------------------------------------------------------------
    @classmethod
    def init(cls, path: str | Path | None = None, witness: str | Path | None = None) -> Workspace:
        """Create a workspace (idempotent: an existing one is opened, never overwritten).

        ``witness``: the file that keeps the latest checkpoint outside the workspace (``ledger/witness.py``
        says where it goes by default).
        """
        root = resolve_path(path)
        if (root / "workspace.json").exists():
            return cls.open(root)
        root.mkdir(parents=True, exist_ok=True)
        for sub in ("objects", "cache", "keys"):
            (root / sub).mkdir(exist_ok=True)
        keys = KeyPair.create(root / "keys")
        settings = {"format": FORMAT, "created": now()}
        if witness:
            settings["witness"] = str(Path(witness).expanduser().resolve())
        ws = cls(root)
        ws._keys = keys
        ws.settings = settings
        ws.ledger = Ledger.create(root / "ledger.db", keys)
        ws.ledger.key_loader = lambda: ws.keys
        ws.ledger.external_witness = witness_path(root, keys.key_id, settings.get("witness"))
        ws.ledger.append(
            "workspace.created", {"format": FORMAT, "public_key": public_to_b64(keys.public), "key_id": keys.key_id}
        )
        ws.ledger.checkpoint()
        write_text(root / "workspace.json", json.dumps(settings, indent=2) + "\n")
        return ws

    @classmethod
    def open(cls, path: str | Path | None = None, reclaim: bool = True) -> Workspace:
        """Open a workspace; ``reclaim``: first clean what killed processes left (see ``debris.py``)."""
        root = resolve_path(path)
        if not (root / "workspace.json").exists() or not (root / "ledger.db").exists():
            raise WorkspaceError(
                f"no finetrace workspace at {root}",
                hint="run `finetrace init` there, or pass --workspace / set FINETRACE_WORKSPACE",
            )
        try:
            settings = json.loads((root / "workspace.json").read_text())
            fmt = settings.get("format")
        except (ValueError, AttributeError):
            raise WorkspaceError(
                f"{root / 'workspace.json'} is not a JSON object",
                hint=f'it holds {{"format": "{FORMAT}", "created": ...}}',
            ) from None
        if fmt != FORMAT:
            raise WorkspaceError(f"{root} holds a workspace of format {fmt!r}; this finetrace reads {FORMAT}")
        ws = cls(root)
        ws.settings = settings
        ws.ledger.open()
        ws.ledger.external_witness = ws.witness_path
        if reclaim:
            try:  # what SIGKILLed commands left: their runs marked interrupted, their scratch deleted
                debris.reclaim(ws)
            except (OSError, sqlite3.Error):
                pass  # best effort here; `finetrace gc` reports what it cannot do
        return ws

    @property
    def witness_path(self) -> Path:
        """The external witness file of this workspace (``ledger/witness.py``)."""
        from .ledger.signing import key_id

        return witness_path(self.root, key_id(self.public_key), self.settings.get("witness"))

    @property
    def keys(self) -> KeyPair:
        if self._keys is None:
            self._keys = KeyPair.load(self.root / "keys")
            self.ledger.keys = self._keys
        return self._keys

    @property
    def public_key(self):
        pem = (self.root / "keys" / "workspace.pub").read_bytes()
        return serialization.load_pem_public_key(pem)

    def checkpoint(self):
        """Sign a checkpoint now (``finetrace checkpoint``, a bundle's proof); runs sign their own at exit."""
        _ = self.keys
        return self.ledger.checkpoint()

    def close(self) -> None:
        self.ledger.close()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def cache(self) -> Path:
        return self.root / "cache"
