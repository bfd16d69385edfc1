"""The ledger database schema, as named migrations applied in order (never edited once shipped).

``entries`` is the append-only log: the truth. Every other table is an index derived from it and can be
rebuilt from it (``Ledger.rebuild_index``); ``finetrace verify`` checks that it matches.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

MIGRATIONS: list[tuple[str, str]] = [
    (
        "0001_log",
        """
        CREATE TABLE entries (
            seq   INTEGER PRIMARY KEY,
            type  TEXT NOT NULL,
            leaf  BLOB NOT NULL,
            body  BLOB NOT NULL
        );
        CREATE INDEX entries_type ON entries(type);
        CREATE TABLE checkpoints (
            size      INTEGER PRIMARY KEY,
            root      TEXT NOT NULL,
            time      TEXT NOT NULL,
            key_id    TEXT NOT NULL,
            signature TEXT NOT NULL
        );
    """,
    ),
    (
        "0002_index",
        """
        CREATE TABLE artifacts (
            digest   TEXT PRIMARY KEY,
            kind     TEXT NOT NULL,
            metadata TEXT NOT NULL,
            run_id   TEXT,
            seq      INTEGER NOT NULL,
            created  TEXT NOT NULL
        );
        CREATE TABLE aliases (
            name     TEXT NOT NULL,
            version  INTEGER NOT NULL,
            digest   TEXT NOT NULL REFERENCES artifacts(digest),
            seq      INTEGER NOT NULL,
            PRIMARY KEY (name, version)
        );
        CREATE INDEX aliases_digest ON aliases(digest);
        CREATE TABLE runs (
            id          TEXT PRIMARY KEY,
            kind        TEXT NOT NULL,
            status      TEXT NOT NULL,
            actor       TEXT,
            config      TEXT NOT NULL,
            environment TEXT NOT NULL,
            metrics     TEXT,
            error       TEXT,
            started     TEXT NOT NULL,
            ended       TEXT,
            seq         INTEGER NOT NULL
        );
        CREATE TABLE edges (
            run_id TEXT NOT NULL,
            digest TEXT NOT NULL,
            role   TEXT NOT NULL CHECK (role IN ('input', 'output')),
            PRIMARY KEY (run_id, digest, role)
        );
        CREATE INDEX edges_digest ON edges(digest);
    """,
    ),
]

INDEX_TABLES = ("artifacts", "aliases", "runs", "edges")


def migrate(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied TEXT NOT NULL)")
    done = {r[0] for r in conn.execute("SELECT name FROM migrations")}
    for name, sql in MIGRATIONS:
        if name in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("SELECT 1 FROM migrations WHERE name=?", (name,)).fetchone():
                conn.execute("COMMIT")
                continue
            for stmt in sql.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute("INSERT INTO migrations VALUES (?, ?)", (name, datetime.now(UTC).isoformat()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
