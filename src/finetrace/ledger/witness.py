"""The external witness: the latest signed checkpoint, kept in a file the workspace folder does not hold.

``witness.json`` inside the workspace can be deleted or swapped for an older signed checkpoint by anyone
who can write the workspace, and a holder of the workspace key can rewrite the whole log and re-sign it.
Neither is detectable from inside the workspace alone. So every checkpoint is also written, by default,
to a file *outside* the workspace folder, and ``finetrace verify`` checks that the log still extends it:

    $FINETRACE_WITNESS                       a file, for this process's workspace (highest priority)
    workspace.json "witness"                 a file, set by ``finetrace init --witness PATH``
    $FINETRACE_WITNESS_DIR/<id>.json         a folder (one file per workspace)
    $XDG_STATE_HOME/finetrace/witness/<id>.json   (default ~/.local/state/finetrace/witness/)

``<id>`` is derived from the workspace's folder and key id, so a copy of a workspace (another folder) has
its own witness. A new checkpoint never overwrites a witness the log does not extend (a truncated or
rewritten log cannot refresh its own witness): ``record`` refuses it. The strongest form is still a
checkpoint someone else keeps (``finetrace checkpoint --export``, the marketplace manifest), passed to
``finetrace verify --checkpoint``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

from ..atomic import write_bytes
from ..canonical import canonical_json
from ..errors import IntegrityError, WorkspaceError
from . import merkle

FORMAT = "finetrace-witness/1"


def witness_path(root: Path, key_id: str, configured: str | None = None) -> Path:
    """Where the external witness of the workspace at ``root`` with key ``key_id`` lives (see module doc)."""
    if os.environ.get("FINETRACE_WITNESS"):
        return Path(os.environ["FINETRACE_WITNESS"]).expanduser()
    if configured:
        return Path(configured).expanduser()
    name = hashlib.sha256(f"{Path(root).resolve()}\n{key_id}".encode()).hexdigest()[:20] + ".json"
    if os.environ.get("FINETRACE_WITNESS_DIR"):
        return Path(os.environ["FINETRACE_WITNESS_DIR"]).expanduser() / name
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state).expanduser() / "finetrace" / "witness" / name


def parse_checkpoint(doc: object, where: str):
    """A ``Checkpoint`` from an exported checkpoint or a witness file's JSON; IntegrityError if malformed."""
    from .log import Checkpoint

    if isinstance(doc, dict) and doc.get("format") == FORMAT:
        doc = doc.get("checkpoint")
    try:
        assert isinstance(doc, dict)
        return Checkpoint(
            int(doc["size"]), str(doc["root"]), str(doc["time"]), str(doc["key_id"]), str(doc["signature"])
        )
    except (AssertionError, KeyError, TypeError, ValueError):
        raise IntegrityError(
            f"{where} is not a finetrace checkpoint (size, root, time, key_id, signature)",
            hint="pass the file written by `finetrace checkpoint --export`",
        ) from None


def load(path: Path):
    """The checkpoint in the witness file at ``path``, or None if there is no such file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IntegrityError(f"the external witness {path} cannot be read: {exc}") from None
    try:
        doc = json.loads(raw)
    except ValueError:
        raise IntegrityError(f"the external witness {path} is not JSON: it was damaged or replaced") from None
    return parse_checkpoint(doc, f"the external witness {path}")


def extends(cp, leaves: list[bytes], roots: dict[int, str] | None = None) -> bool:
    """True if the log with these leaf hashes has ``cp``'s tree as a prefix (``roots`` caches prefix roots)."""
    if cp.size > len(leaves):
        return False
    roots = {} if roots is None else roots
    if cp.size not in roots:
        roots[cp.size] = merkle.root(leaves[: cp.size]).hex()
    return roots[cp.size] == cp.root


def record(path: Path, cp, leaves: list[bytes], workspace: Path, roots: dict[int, str] | None = None) -> None:
    """Write ``cp`` to the witness at ``path`` unless the log (``leaves``) does not extend what is there.

    Raises IntegrityError when the old witness is signed by another key or is no longer a prefix of the
    log (never overwrite the evidence). An unwritable location is a warning: the checkpoint itself is
    stored, and ``finetrace verify`` reports a witness that fell behind.
    """
    old = load(path)
    if old is not None:
        if old.key_id != cp.key_id:
            raise WorkspaceError(
                f"the external witness {path} belongs to another workspace key ({old.key_id})",
                hint="set FINETRACE_WITNESS or workspace.json 'witness' to a file of this workspace's own",
            )
        if old.size > cp.size or not extends(old, leaves, roots):
            raise IntegrityError(
                f"the ledger no longer extends the checkpoint (size {old.size}) in the external "
                f"witness {path}: entries were removed or rewritten; refusing to overwrite it",
                hint="run `finetrace verify` to see what changed",
            )
        if old.size == cp.size:
            return
    body = canonical_json({"format": FORMAT, "workspace": str(workspace), "checkpoint": cp.to_dict()}) + b"\n"
    try:
        write_bytes(path, body)
    except OSError as exc:
        warnings.warn(
            f"could not write the external witness {path}: {exc}; `finetrace verify` will say it is behind",
            stacklevel=2,
        )
