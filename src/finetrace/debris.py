"""Crash debris: which writers are alive, dead runs marked interrupted, scratch space reclaimed.

A process killed by SIGKILL runs no cleanup: its run stays "running" in the ledger and its scratch files
stay on disk. So every process that writes in a workspace holds a lock for as long as it lives, and
names what it leaves behind after that lock::

    <ws>/locks/<token>.lock        flock'ed by the live process <token> (the kernel drops it at death)
    <ws>/locks/runs/<run id>       the token of the process running that run (from before run.started
                                   until after run.finished)
    <ws>/cache/import-<token>-*    import scratch        <ws>/cache/.train-<token>-*   adapter being written
    <ws>/objects/tmp/<token>-*.part  object being stored <ws>/cache/trees/.build-<token>-*  materialising
    <ws>/checkpoints/train/*/.build-<token>-*   a checkpoint being written or deleted

``reclaim(ws)`` (run by ``Workspace.open``, so on the next start of any command, and by ``finetrace gc``)
appends ``run.finished`` with status ``interrupted`` for each run whose process is dead, and deletes the
scratch entries of dead processes. Entries of live processes are never touched, so it is safe while other
commands run. Entries without a token (written before lock files existed) are removed only by
``finetrace gc``.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

_HELD: dict[tuple[int, str], tuple[str, int]] = {}  # (pid, workspace root) -> (token, lock fd)
_TOKEN = re.compile(r"^(?:import-|\.train-|\.build-)?([0-9a-f]{12})-")
# (folder under the workspace, name prefix) of every kind of scratch entry
SCRATCH = (
    ("cache", "import-"),
    ("cache", ".train-"),
    ("objects/tmp", ""),
    ("cache/trees", ".build-"),
    ("checkpoints/train/*", ".build-"),
)


def _locks(root: Path) -> Path:
    return Path(root) / "locks"


def token(root: str | Path) -> str:
    """This process's token for workspace ``root``, its lock taken (once per process and workspace)."""
    key = (os.getpid(), str(Path(root).resolve()))
    if key not in _HELD:
        locks = _locks(Path(key[1]))
        locks.mkdir(parents=True, exist_ok=True)
        tok = secrets.token_hex(6)
        tmp = locks / f".{tok}.new"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.replace(tmp, locks / f"{tok}.lock")  # locked before it has the name others look at
        _HELD[key] = (tok, fd)
    return _HELD[key][0]


def alive(root: str | Path, tok: str) -> bool:
    """Whether the process that took ``tok`` still lives (its lock file is held)."""
    key = (os.getpid(), str(Path(root).resolve()))
    if key in _HELD and _HELD[key][0] == tok:
        return True
    try:
        fd = os.open(_locks(Path(root)) / f"{tok}.lock", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def scratch_prefix(root: str | Path, kind: str = "") -> str:
    """Prefix of a scratch entry's name (``kind`` is "import-", ".train-", ".build-" or "" for .part)."""
    return f"{kind}{token(root)}-"


def run_started(root: str | Path, run_id: str) -> None:
    """Record that this process runs ``run_id`` (before its ``run.started`` entry is appended)."""
    folder = _locks(Path(root)) / "runs"
    tok = token(root)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{run_id}.new"
    tmp.write_text(tok + "\n")
    os.replace(tmp, folder / run_id)


def run_ended(root: str | Path, run_id: str) -> None:
    (_locks(Path(root)) / "runs" / run_id).unlink(missing_ok=True)


@dataclass
class Reclaimed:
    """What ``reclaim`` did (and what it left, and why)."""

    interrupted: list[str] = field(default_factory=list)  # runs marked interrupted now
    running: list[str] = field(default_factory=list)  # runs whose process is alive
    unowned: list[str] = field(default_factory=list)  # "running" with no lock file (gc only)
    removed: list[str] = field(default_factory=list)  # scratch paths deleted
    bytes_freed: int = 0
    kept: list[str] = field(default_factory=list)  # scratch of live processes

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class _NotRunning(Exception):
    """Raised inside the append transaction: the run already finished (someone else marked it)."""


def _mark_interrupted(ws, run_id: str, tok: str) -> bool:
    def data(conn):
        row = conn.execute("SELECT status FROM runs WHERE id=?", (run_id,)).fetchone()
        if not row or row[0] != "running":
            raise _NotRunning(run_id)
        return {
            "id": run_id,
            "status": "interrupted",
            "metrics": {},
            "inputs": [],
            "error": f"the process running it (lock {tok}) died without finishing it (killed or crashed); "
            f"marked by finetrace on the next start",
        }

    try:
        ws.ledger.append("run.finished", data)  # checked and appended in one transaction
        return True
    except _NotRunning:
        return False


def _size(p: Path) -> int:
    if p.is_dir() and not p.is_symlink():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
    return p.lstat().st_size


def reclaim(ws, *, unowned: bool = False, dry_run: bool = False) -> Reclaimed:
    """Mark dead runs interrupted and delete dead processes' scratch; ``unowned``: also token-less entries.

    ``dry_run`` reports what would be done and changes nothing.
    """
    root = Path(ws.root)
    out = Reclaimed()
    runs_dir = _locks(root) / "runs"
    owned_runs = set()
    for f in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        if f.name.startswith("."):
            continue
        owned_runs.add(f.name)
        tok = f.read_text().strip()
        if alive(root, tok):
            out.running.append(f.name)
            continue
        if dry_run or _mark_interrupted(ws, f.name, tok):  # False: it had finished, or never started
            out.interrupted.append(f.name)
        if not dry_run:
            f.unlink(missing_ok=True)
    if unowned:
        out.unowned = [
            r
            for (r,) in ws.ledger.conn.execute("SELECT id FROM runs WHERE status='running' ORDER BY seq")
            if r not in owned_runs
        ]
    for sub, prefix in SCRATCH:
        for e in sorted(e for folder in root.glob(sub) if folder.is_dir() for e in folder.iterdir()):
            if not e.name.startswith(prefix) or (sub == "objects/tmp" and not e.name.endswith(".part")):
                continue
            m = _TOKEN.match(e.name)
            if m is None and not unowned:
                continue
            if m is not None and alive(root, m.group(1)):
                out.kept.append(str(e))
                continue
            out.bytes_freed += _size(e)
            out.removed.append(str(e))
            if dry_run:
                continue
            if e.is_dir() and not e.is_symlink():
                shutil.rmtree(e, ignore_errors=True)
            else:
                e.unlink(missing_ok=True)
    _drop_dead_locks(root, dry_run)
    return out


def _drop_dead_locks(root: Path, dry_run: bool) -> None:
    """Delete the lock files of dead processes (and half-made ones of processes killed while making them)."""
    locks = _locks(root)
    if dry_run or not locks.is_dir():
        return
    for f in sorted(locks.glob("*.lock")):
        if not alive(root, f.stem):
            f.unlink(missing_ok=True)
    for f in sorted([*locks.glob(".*.new"), *locks.glob("runs/.*.new")]):
        try:  # a minute old: its maker was killed between creating and renaming it
            if time.time() - f.stat().st_mtime > 60:
                f.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
