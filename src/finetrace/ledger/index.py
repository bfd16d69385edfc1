"""The ledger's index handlers: one per entry type, writing the relational index (artifacts, aliases,
runs, edges) from an entry. The same code runs on append and on ``Ledger.rebuild_index``, so the index
is always derivable from the log. Re-exported by ``finetrace.ledger.log``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from ..canonical import canonical_json


# duplicates: alike _ix_run_started on purpose (one index writer per ledger event kind).
def _ix_artifact(conn: sqlite3.Connection, e: dict) -> None:
    d = e["data"]
    conn.execute(
        "INSERT OR IGNORE INTO artifacts VALUES (?,?,?,?,?,?)",
        (
            d["digest"],
            d["kind"],
            canonical_json(d.get("metadata") or {}).decode(),
            d.get("run_id"),
            e["seq"],
            e["time"],
        ),
    )
    if d.get("name"):
        conn.execute("INSERT INTO aliases VALUES (?,?,?,?)", (d["name"], d["version"], d["digest"], e["seq"]))
    if d.get("run_id"):
        conn.execute("INSERT OR IGNORE INTO edges VALUES (?,?,'output')", (d["run_id"], d["digest"]))


# duplicates: alike _ix_artifact on purpose (one index writer per ledger event kind).
def _ix_run_started(conn: sqlite3.Connection, e: dict) -> None:
    d = e["data"]
    conn.execute(
        "INSERT INTO runs (id, kind, status, actor, config, environment, started, seq) VALUES (?,?,?,?,?,?,?,?)",
        (
            d["id"],
            d["kind"],
            "running",
            e["actor"],
            canonical_json(d["config"]).decode(),
            canonical_json(d["environment"]).decode(),
            e["time"],
            e["seq"],
        ),
    )
    for digest in d.get("inputs", []):
        conn.execute("INSERT OR IGNORE INTO edges VALUES (?,?,'input')", (d["id"], digest))


def _ix_run_finished(conn: sqlite3.Connection, e: dict) -> None:
    d = e["data"]
    conn.execute(
        "UPDATE runs SET status=?, metrics=?, error=?, ended=? WHERE id=?",
        (d["status"], canonical_json(d.get("metrics") or {}).decode(), d.get("error"), e["time"], d["id"]),
    )
    for digest in d.get("inputs", []):
        conn.execute("INSERT OR IGNORE INTO edges VALUES (?,?,'input')", (d["id"], digest))


def _ix_run_output(conn: sqlite3.Connection, e: dict) -> None:
    conn.execute("INSERT OR IGNORE INTO edges VALUES (?,?,'output')", (e["data"]["run_id"], e["data"]["digest"]))


INDEXERS: dict[str, Callable[[sqlite3.Connection, dict], None]] = {
    "artifact.added": _ix_artifact,
    "run.output": _ix_run_output,
    "run.started": _ix_run_started,
    "run.finished": _ix_run_finished,
}
