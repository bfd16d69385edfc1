"""The ledger: an append-only Merkle log of events, with a relational index derived from it.

Each entry is canonical JSON ``{"seq", "type", "time", "actor", "data"}``; its leaf hash is
``SHA-256(0x00 || entry)`` (RFC 6962). Appends run in ``BEGIN IMMEDIATE`` transactions on a WAL-mode
SQLite file, so any number of processes can append concurrently and the log stays gap-free. The index
(artifacts, aliases, runs, edges) is updated in the same transaction by one handler per entry type, and
``rebuild_index`` replays the log through the same handlers, so the index is always derivable.

Signed checkpoints (size, root, time, Ed25519 signature) pin the log: an edit, deletion or truncation of
an entry changes the root of every checkpoint that covers it. Each checkpoint is also written to
``witness.json`` beside the database and to the external witness outside the workspace folder
(``witness.py``): removing entries together with their checkpoints, or re-signing a rewritten log with
the workspace key, is detectable only against a checkpoint kept outside (see ``docs/ledger.md``).

The record types live in ``records.py`` and the index handlers in ``index.py``; both are re-exported here.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import debris, environment
from ..atomic import write_bytes
from ..canonical import DIGEST_RE, canonical_json
from ..errors import FinetraceError, InputError, IntegrityError, NotFoundError, WorkspaceError
from . import merkle, witness
from .index import INDEXERS
from .records import ARTIFACT_KINDS, RUN_KINDS, Artifact, Checkpoint, Entry, Run, actor, now
from .schema import INDEX_TABLES, migrate
from .signing import KeyPair

# duplicates: alike ledger/__init__.py:__all__ on purpose (the package re-exports the names of ledger.log).
__all__ = [
    "ARTIFACT_KINDS",
    "INDEXERS",
    "RUN_KINDS",
    "Artifact",
    "Checkpoint",
    "Entry",
    "Ledger",
    "Run",
    "RunRecorder",
    "actor",
    "check_name",
    "now",
]


class Ledger:
    """The workspace ledger in ``ledger.db``. ``keys`` may be None for read-only verification."""

    def __init__(self, path: str | Path, keys: KeyPair | None = None):
        self.path = Path(path)
        self.keys = keys
        self.witness = self.path.parent / "witness.json"
        self.external_witness: Path | None = None  # set by the workspace (see witness.py)
        self.key_loader: Callable[[], Any] | None = None  # set by the workspace: loads ``keys`` on first use
        self._conn: sqlite3.Connection | None = None

    # -- connection ---------------------------------------------------------------------------
    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            if not self.path.exists():
                raise WorkspaceError(f"no ledger at {self.path}")
            try:
                self._conn = self._connect()
            except sqlite3.DatabaseError as exc:
                raise self.damaged(exc) from None
        return self._conn

    def damaged(self, exc: Exception) -> IntegrityError:
        """The error for a ledger.db that SQLite cannot read (truncated, overwritten, not a database)."""
        try:
            size = f"{self.path.stat().st_size} bytes"
        except OSError:
            size = "unreadable"
        return IntegrityError(
            f"the ledger database {self.path} is damaged ({size}; SQLite: {exc})",
            hint="restore ledger.db from a backup, then check it with `finetrace verify "
            "--checkpoint` against a checkpoint kept outside the workspace",
        )

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=60000")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @classmethod
    def create(cls, path: str | Path, keys: KeyPair) -> Ledger:
        led = cls(path, keys)
        led._conn = led._connect()
        migrate(led._conn)
        return led

    def open(self) -> Ledger:
        try:
            migrate(self.conn)
            self.conn.execute("SELECT COUNT(*) FROM entries").fetchone()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise self.damaged(exc) from None
        return self

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # -- the log ------------------------------------------------------------------------------
    def append(
        self, type: str, data: dict | Callable[[sqlite3.Connection], dict], who: str | None = None, seal: bool = False
    ) -> Entry:
        """Append one event. ``data`` may be a function of the locked connection (to number versions).
        ``seal``: sign a checkpoint at once (an event outside any run; runs seal when they end)."""
        with self._tx() as conn:
            entry = self._append_locked(conn, type, data, who)
        if seal:
            self.seal()
        return entry

    def seal(self) -> Checkpoint | None:
        """Sign a checkpoint now (loading the key if need be; None without one). Every run ends with it."""
        if self.keys is None and self.key_loader is not None:
            self.key_loader()
        return self.checkpoint() if self.keys is not None else None

    def append_many(self, type: str, datas: list[dict], who: str | None = None) -> list[Entry]:
        """Append several events of one type in one transaction (all or none)."""
        with self._tx() as conn:
            return [self._append_locked(conn, type, d, who) for d in datas]

    def _append_locked(self, conn, type, data, who) -> Entry:
        payload = data(conn) if callable(data) else data
        (size,) = conn.execute("SELECT COUNT(*) FROM entries").fetchone()
        (top,) = conn.execute("SELECT COALESCE(MAX(seq), -1) FROM entries").fetchone()
        if top != size - 1:
            raise WorkspaceError(
                f"the ledger has a gap (size {size}, last entry {top})", hint="run `finetrace verify` to find it"
            )
        body = {"seq": size, "type": type, "time": now(), "actor": who or actor(), "data": payload}
        raw = canonical_json(body)
        leaf = merkle.leaf_hash(raw)
        conn.execute("INSERT INTO entries VALUES (?,?,?,?)", (size, type, leaf, raw))
        handler = INDEXERS.get(type)
        if handler:
            handler(conn, body)
        return Entry(size, type, body["time"], body["actor"], payload, leaf)

    def size(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def entries(self, start: int = 0, end: int | None = None, type: str | None = None) -> Iterator[Entry]:
        sql = "SELECT seq, leaf, body FROM entries WHERE seq >= ?"
        args: list[Any] = [start]
        if end is not None:
            sql += " AND seq < ?"
            args.append(end)
        if type is not None:
            sql += " AND type = ?"
            args.append(type)
        for seq, leaf, body in self.conn.execute(sql + " ORDER BY seq", args):
            yield Entry.from_row(seq, leaf, body)

    def entry(self, seq: int) -> Entry:
        row = self.conn.execute("SELECT seq, leaf, body FROM entries WHERE seq=?", (seq,)).fetchone()
        if not row:
            raise NotFoundError(f"no ledger entry {seq}")
        return Entry.from_row(*row)

    def raw_entry(self, seq: int) -> bytes:
        row = self.conn.execute("SELECT body FROM entries WHERE seq=?", (seq,)).fetchone()
        if not row:
            raise NotFoundError(f"no ledger entry {seq}")
        return bytes(row[0])

    def leaves(self, size: int | None = None) -> list[bytes]:
        sql = "SELECT leaf FROM entries ORDER BY seq"
        rows = self.conn.execute(sql if size is None else sql + f" LIMIT {int(size)}")
        return [bytes(r[0]) for r in rows]

    def root(self, size: int | None = None) -> bytes:
        return merkle.root(self.leaves(size))

    def inclusion_proof(self, seq: int, size: int) -> list[bytes]:
        return merkle.inclusion_proof(seq, self.leaves(size))

    def consistency_proof(self, old_size: int, size: int) -> list[bytes]:
        return merkle.consistency_proof(old_size, self.leaves(size))

    # -- checkpoints --------------------------------------------------------------------------
    def checkpoint(self) -> Checkpoint:
        """Sign the current tree head, store it, and write it to ``witness.json`` and the external witness.

        Refuses (IntegrityError) when the log no longer extends either witness: a truncated or rewritten
        log cannot refresh the evidence against itself.
        """
        if self.keys is None:
            raise WorkspaceError("this ledger was opened without its signing key")
        with self._witness_lock(), self._tx() as conn:
            leaves = [bytes(r[0]) for r in conn.execute("SELECT leaf FROM entries ORDER BY seq")]
            size = len(leaves)
            roots = {size: merkle.root(leaves).hex()}  # prefix roots, computed once for every check below
            for path in self._witness_files():
                old = witness.load(path)
                if old is not None and old.key_id == self.keys.key_id and not witness.extends(old, leaves, roots):
                    raise IntegrityError(
                        f"the ledger no longer extends the checkpoint (size {old.size}) in "
                        f"{path}: entries were removed or rewritten; no new checkpoint signed",
                        hint="run `finetrace verify` to see what changed",
                    )
            last = conn.execute(
                "SELECT size, root, time, key_id, signature FROM checkpoints ORDER BY size DESC LIMIT 1"
            ).fetchone()
            if last and last[0] == size:
                cp = Checkpoint(*last)
            else:
                unsigned = Checkpoint(size, roots[size], now(), self.keys.key_id, "")
                cp = Checkpoint(size, unsigned.root, unsigned.time, unsigned.key_id, self.keys.sign(unsigned.message()))
                conn.execute(
                    "INSERT INTO checkpoints VALUES (?,?,?,?,?)", (cp.size, cp.root, cp.time, cp.key_id, cp.signature)
                )
            conn.execute("COMMIT")  # stored first: a witness never names a checkpoint that is not stored
            conn.execute("BEGIN")  # (the context manager's COMMIT closes this empty transaction)
            # still under the witness lock, so concurrent checkpoints reach the witnesses in order
            write_bytes(self.witness, canonical_json(cp.to_dict()) + b"\n")
            if self.external_witness is not None:
                witness.record(self.external_witness, cp, leaves, self.path.parent, roots)
        return cp

    @contextlib.contextmanager
    def _witness_lock(self) -> Iterator[None]:
        """An exclusive lock (``witness.lock``) around signing a checkpoint and writing the witnesses."""
        import fcntl

        with open(self.path.parent / "witness.lock", "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _witness_files(self) -> list[Path]:
        return [self.witness] + ([self.external_witness] if self.external_witness is not None else [])

    def checkpoints(self) -> list[Checkpoint]:
        return [
            Checkpoint(*r)
            for r in self.conn.execute("SELECT size, root, time, key_id, signature FROM checkpoints ORDER BY size")
        ]

    # -- artifacts ----------------------------------------------------------------------------
    def add_artifact(
        self, kind: str, digest: str, name: str | None = None, metadata: dict | None = None, run_id: str | None = None
    ) -> Artifact:
        """Record an artifact; with ``name``, give it the next version ``name@N``.

        Adding the same digest under the same name as that name's latest version is a no-op that
        returns the existing artifact (re-running an import does not mint a new version).
        """
        if kind not in ARTIFACT_KINDS:
            raise InputError(f"unknown artifact kind {kind!r}", hint=f"one of {', '.join(ARTIFACT_KINDS)}")
        if not DIGEST_RE.match(digest):
            raise InputError(f"not a digest: {digest!r}")
        if name is not None:
            check_name(name)
        with self._tx() as conn:
            existing = conn.execute("SELECT kind FROM artifacts WHERE digest=?", (digest,)).fetchone()
            if existing and existing[0] != kind:
                raise InputError(f"{digest} is already recorded as a {existing[0]}, not a {kind}")
            latest = None
            if name:
                latest = conn.execute(
                    "SELECT version, digest FROM aliases WHERE name=? ORDER BY version DESC LIMIT 1", (name,)
                ).fetchone()
            if existing and (not name or (latest and latest[1] == digest)):
                # Known artifact, no new alias. A new run producing the same bytes still links to it.
                if (
                    run_id
                    and not conn.execute(
                        "SELECT 1 FROM edges WHERE run_id=? AND digest=? AND role='output'", (run_id, digest)
                    ).fetchone()
                ):
                    self._append_locked(conn, "run.output", {"run_id": run_id, "digest": digest}, None)
            else:
                version = (latest[0] + 1) if latest else 1
                data = {"digest": digest, "kind": kind, "metadata": metadata or {}, "run_id": run_id}
                if name:
                    data.update(name=name, version=version)
                self._append_locked(conn, "artifact.added", data, None)
        return self.artifact(digest)

    def has_artifact(self, digest: str) -> bool:
        """Whether ``digest`` is a recorded artifact."""
        return self.conn.execute("SELECT 1 FROM artifacts WHERE digest=?", (digest,)).fetchone() is not None

    def artifact(self, digest: str) -> Artifact:
        row = self.conn.execute(
            "SELECT digest, kind, metadata, run_id, created FROM artifacts WHERE digest=?", (digest,)
        ).fetchone()
        if not row:
            raise NotFoundError(f"no artifact {digest}")
        aliases = [
            f"{n}@{v}"
            for n, v in self.conn.execute("SELECT name, version FROM aliases WHERE digest=? ORDER BY seq", (digest,))
        ]
        return Artifact(row[0], row[1], json.loads(row[2]), row[3], row[4], aliases)

    def resolve(self, ref: str, kind: str | None = None) -> Artifact:
        """``sha256:<hex>``, a unique hex prefix (6+), ``name@N``, ``name@latest`` or ``name``."""
        ref = ref.strip()
        digest = None
        if ref.startswith("sha256:") or (len(ref) >= 6 and all(c in "0123456789abcdef" for c in ref)):
            hexpart = ref.split(":", 1)[-1]
            rows = self.conn.execute(
                "SELECT digest FROM artifacts WHERE digest LIKE ?", (f"sha256:{hexpart}%",)
            ).fetchall()
            if len(rows) > 1:
                raise InputError(
                    f"digest prefix {ref!r} is ambiguous ({len(rows)} artifacts)", hint="give more characters"
                )
            digest = rows[0][0] if rows else None
        if digest is None:
            name, _, version = ref.partition("@")
            if version and version != "latest":
                if not version.isdigit():
                    raise InputError(f"bad version in {ref!r}", hint="use NAME@N with N a number, or NAME@latest")
                row = self.conn.execute(
                    "SELECT digest FROM aliases WHERE name=? AND version=?", (name, int(version))
                ).fetchone()
            else:
                row = self.conn.execute(
                    "SELECT digest FROM aliases WHERE name=? ORDER BY version DESC LIMIT 1", (name,)
                ).fetchone()
            digest = row[0] if row else None
        if digest is None:
            known = [
                r[0]
                for r in self.conn.execute(
                    "SELECT DISTINCT a.name FROM aliases a JOIN artifacts t ON a.digest=t.digest"
                    + (" WHERE t.kind=?" if kind else ""),
                    (kind,) if kind else (),
                )
            ]
            hint = f"known: {', '.join(sorted(known)[:10])}" if known else "nothing of that kind is recorded yet"
            raise NotFoundError(f"no {kind or 'artifact'} named {ref!r} in this workspace", hint=hint)
        art = self.artifact(digest)
        if kind and art.kind != kind:
            raise InputError(f"{ref} is a {art.kind}, not a {kind}")
        return art

    def artifacts(self, kind: str | None = None) -> list[Artifact]:
        sql = "SELECT digest FROM artifacts" + (" WHERE kind=?" if kind else "") + " ORDER BY seq"
        return [self.artifact(r[0]) for r in self.conn.execute(sql, (kind,) if kind else ())]

    # -- runs ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def run(
        self,
        kind: str,
        config: dict,
        inputs: list[str] = (),
        seed: int | None = None,
        environment_extra: dict | None = None,
    ) -> Iterator[RunRecorder]:
        """Record a run around a block: ``run.started`` now, ``run.finished`` (ok or failed) at exit,
        then a signed checkpoint covering the whole run (:meth:`seal`).

            with ledger.run("train", config=cfg, inputs=[base, data], seed=0) as run:
                adapter = run.output("adapter", digest, name="legal-lora")
                run.metrics["final_loss"] = 0.31
        """
        if kind not in RUN_KINDS:
            raise InputError(f"unknown run kind {kind!r}", hint=f"one of {', '.join(RUN_KINDS)}")
        rec = RunRecorder(self, f"{kind}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}", list(inputs))
        debris.run_started(self.path.parent, rec.id)  # so a SIGKILLed run is found and marked interrupted
        try:
            yield from self._recorded(rec, kind, config, seed, environment_extra)
        finally:
            debris.run_ended(self.path.parent, rec.id)

    def _recorded(self, rec: RunRecorder, kind: str, config: dict, seed, environment_extra):
        self.append(
            "run.started",
            {
                "id": rec.id,
                "kind": kind,
                "config": config,
                "inputs": rec.inputs,
                "environment": environment.capture(seed, environment_extra),
            },
        )
        try:
            yield rec
        except BaseException as exc:
            status = "interrupted" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "failed"
            msg = (
                str(exc)
                if isinstance(exc, FinetraceError)
                else "".join(traceback.format_exception_only(type(exc), exc)).strip()
            )
            self.append(
                "run.finished",
                {
                    "id": rec.id,
                    "status": status,
                    "metrics": rec.metrics,
                    "error": msg[:2000],
                    "inputs": rec.late_inputs,
                },
            )
            try:
                self.seal()
            except (FinetraceError, OSError, sqlite3.Error) as bad:  # the run's own error matters more
                exc.add_note(f"finetrace: no checkpoint was signed after the failed run: {bad}")
            raise
        self.append(
            "run.finished", {"id": rec.id, "status": "succeeded", "metrics": rec.metrics, "inputs": rec.late_inputs}
        )
        self.seal()

    def get_run(self, run_id: str) -> Run:
        row = self.conn.execute(
            "SELECT id, kind, status, actor, config, environment, metrics, error, "
            "started, ended FROM runs WHERE id=? OR id LIKE ?",
            (run_id, f"%{run_id}"),
        ).fetchone()
        if not row:
            raise NotFoundError(f"no run {run_id!r}", hint="`finetrace log` lists runs")
        ins = [
            r[0]
            for r in self.conn.execute(
                "SELECT digest FROM edges WHERE run_id=? AND role='input' ORDER BY rowid", (row[0],)
            )
        ]
        outs = [
            r[0]
            for r in self.conn.execute(
                "SELECT e.digest FROM edges e JOIN artifacts a ON a.digest=e.digest "
                "WHERE e.run_id=? AND e.role='output' ORDER BY a.seq",
                (row[0],),
            )
        ]
        return Run(
            row[0],
            row[1],
            row[2],
            row[3],
            json.loads(row[4]),
            json.loads(row[5]),
            json.loads(row[6]) if row[6] else None,
            row[7],
            row[8],
            row[9],
            ins,
            outs,
        )

    def runs(self, kind: str | None = None) -> list[Run]:
        sql = "SELECT id FROM runs" + (" WHERE kind=?" if kind else "") + " ORDER BY seq"
        return [self.get_run(r[0]) for r in self.conn.execute(sql, (kind,) if kind else ())]

    def producer(self, digest: str) -> str | None:
        row = self.conn.execute("SELECT run_id FROM artifacts WHERE digest=?", (digest,)).fetchone()
        return row[0] if row else None

    def consumers(self, digest: str) -> list[str]:
        return [
            r[0]
            for r in self.conn.execute(
                "SELECT e.run_id FROM edges e JOIN runs r ON r.id=e.run_id WHERE e.digest=? AND e.role='input' "
                "ORDER BY r.seq",
                (digest,),
            )
        ]

    # -- index --------------------------------------------------------------------------------
    def index_snapshot(self, conn: sqlite3.Connection | None = None) -> dict[str, list[tuple]]:
        conn = conn or self.conn
        return {t: sorted(tuple(r) for r in conn.execute(f"SELECT * FROM {t}")) for t in INDEX_TABLES}

    def replay_index(self) -> dict[str, list[tuple]]:
        """Build the index from the log alone in a scratch in-memory database and return it."""
        mem = sqlite3.connect(":memory:", isolation_level=None)
        migrate(mem)
        for _seq, body in self.conn.execute("SELECT seq, body FROM entries ORDER BY seq"):
            try:
                doc = json.loads(body)
                handler = INDEXERS.get(doc["type"])
                if handler:
                    handler(mem, doc)
            except (ValueError, KeyError, sqlite3.Error):
                continue  # a damaged entry: verify_log reports it by sequence number
        snap = self.index_snapshot(mem)
        mem.close()
        return snap

    def rebuild_index(self) -> None:
        """Drop the derived tables' rows and replay the log through the index handlers."""
        with self._tx() as conn:
            for t in reversed(INDEX_TABLES):
                conn.execute(f"DELETE FROM {t}")
            for _seq, body in conn.execute("SELECT seq, body FROM entries ORDER BY seq").fetchall():
                doc = json.loads(body)
                handler = INDEXERS.get(doc["type"])
                if handler:
                    handler(conn, doc)


class RunRecorder:
    """Handle given inside ``Ledger.run``: record outputs and metrics of the running run."""

    def __init__(self, ledger: Ledger, run_id: str, inputs: list[str]):
        self.ledger = ledger
        self.id = run_id
        self.inputs = inputs
        self.late_inputs: list[str] = []
        self.metrics: dict[str, Any] = {}
        self.outputs: list[Artifact] = []

    def input(self, digest: str) -> None:
        """Declare an input discovered during the run (recorded with ``run.finished``)."""
        if digest not in self.inputs and digest not in self.late_inputs:
            self.late_inputs.append(digest)

    def output(self, kind: str, digest: str, name: str | None = None, metadata: dict | None = None) -> Artifact:
        art = self.ledger.add_artifact(kind, digest, name=name, metadata=metadata, run_id=self.id)
        self.outputs.append(art)
        return art

    def event(self, type: str, data: dict) -> Entry:
        return self.ledger.append(type, {"run_id": self.id, **data})


def check_name(name: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}", name) or ".." in name:
        raise InputError(
            f"bad name {name!r}", hint="use letters, digits, '.', '_', '-', '/', starting with a letter or digit"
        )
    return name
