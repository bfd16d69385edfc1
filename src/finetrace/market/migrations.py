"""The registry database's schema, as frozen, named migrations applied in order.

Each migration is recorded by name in ``market_migrations`` once applied, and never changes after it has
shipped: a change to the models in ``db.py`` needs a new migration here (``tests/market/test_migrations.py``
checks that a migrated database has every column and index of the models, and that a database made with
the first schema upgrades to the current one with its rows intact). ``001_schema`` is the DDL of the
first release, written out (not ``create_all`` of today's models, which would change with them).

    migrate(engine)                       apply what is missing; returns the names applied now
    migrate(engine, upto="001_schema")    stop after that one (tests build an old database this way)
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import text
from sqlalchemy.engine import Engine

MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS market_migrations (name VARCHAR(100) NOT NULL PRIMARY KEY, "
    "applied {timestamp} NOT NULL)"
)

# the first release's tables (finetrace 644675d), for SQLite and PostgreSQL: {serial} and {timestamp} differ
SCHEMA_001 = (
    """CREATE TABLE accounts (id {serial} NOT NULL, name VARCHAR(64) NOT NULL, token_hash VARCHAR(80) NOT NULL,
        is_admin BOOLEAN NOT NULL, created {timestamp} NOT NULL,
        PRIMARY KEY (id), UNIQUE (name), UNIQUE (token_hash))""",
    """CREATE TABLE base_models (digest VARCHAR(80) NOT NULL, name VARCHAR(200) NOT NULL, shapes JSON NOT NULL,
        PRIMARY KEY (digest))""",
    """CREATE TABLE namespaces (id {serial} NOT NULL, name VARCHAR(64) NOT NULL, owner_id INTEGER NOT NULL,
        PRIMARY KEY (id), UNIQUE (name), FOREIGN KEY (owner_id) REFERENCES accounts (id))""",
    """CREATE TABLE uploads (id VARCHAR(40) NOT NULL, account_id INTEGER NOT NULL, ref VARCHAR(200) NOT NULL,
        manifest_digest VARCHAR(80) NOT NULL, manifest JSON NOT NULL, signature JSON NOT NULL,
        created {timestamp} NOT NULL,
        PRIMARY KEY (id), UNIQUE (ref, manifest_digest), FOREIGN KEY (account_id) REFERENCES accounts (id))""",
    """CREATE TABLE namespace_keys (id {serial} NOT NULL, namespace_id INTEGER NOT NULL, key_id VARCHAR(80) NOT NULL,
        public_key VARCHAR(100) NOT NULL,
        PRIMARY KEY (id), UNIQUE (namespace_id, key_id), FOREIGN KEY (namespace_id) REFERENCES namespaces (id))""",
    """CREATE TABLE packages (id {serial} NOT NULL, namespace_id INTEGER NOT NULL, name VARCHAR(64) NOT NULL,
        downloads BIGINT NOT NULL, latest_version_id INTEGER,
        PRIMARY KEY (id), UNIQUE (namespace_id, name), FOREIGN KEY (namespace_id) REFERENCES namespaces (id))""",
    "CREATE INDEX ix_packages_downloads ON packages (downloads)",
    """CREATE TABLE versions (id {serial} NOT NULL, package_id INTEGER NOT NULL, version VARCHAR(32) NOT NULL,
        ref VARCHAR(200) NOT NULL, manifest_digest VARCHAR(80) NOT NULL, manifest JSON NOT NULL,
        signature JSON NOT NULL, key_id VARCHAR(80) NOT NULL, description TEXT NOT NULL,
        license_id VARCHAR(64) NOT NULL, base_name VARCHAR(200) NOT NULL, base_digest VARCHAR(80) NOT NULL,
        domains VARCHAR(400) NOT NULL, tasks VARCHAR(400) NOT NULL, score FLOAT, search_text TEXT NOT NULL,
        publisher VARCHAR(64) NOT NULL, created {timestamp} NOT NULL,
        PRIMARY KEY (id), UNIQUE (package_id, version), FOREIGN KEY (package_id) REFERENCES packages (id))""",
    "CREATE INDEX ix_versions_base ON versions (base_digest)",
    "CREATE INDEX ix_versions_created ON versions (created)",
    "CREATE INDEX ix_versions_license ON versions (license_id)",
    "CREATE INDEX ix_versions_score ON versions (score)",
    """CREATE TABLE metrics (version_id INTEGER NOT NULL, name VARCHAR(64) NOT NULL, value FLOAT NOT NULL,
        PRIMARY KEY (version_id, name), FOREIGN KEY (version_id) REFERENCES versions (id))""",
    "CREATE INDEX ix_metrics_name_value ON metrics (name, value)",
)
TYPES = {
    "sqlite": {"serial": "INTEGER", "timestamp": "DATETIME"},
    "postgresql": {"serial": "SERIAL", "timestamp": "TIMESTAMP WITHOUT TIME ZONE"},
}


def _ddl(dialect: str, sql: str) -> str:
    return sql.format(**TYPES.get(dialect, TYPES["sqlite"]))


def _m001_schema(conn, dialect: str) -> None:
    for stmt in SCHEMA_001:
        conn.execute(text(_ddl(dialect, stmt)))


def _m002_fulltext(conn, dialect: str) -> None:
    if dialect == "sqlite":
        conn.execute(
            text("CREATE VIRTUAL TABLE IF NOT EXISTS versions_fts USING fts5(search_text, tokenize='porter unicode61')")
        )
        # versions stored before the index existed (a database left at 001) become searchable too
        conn.execute(
            text(
                "INSERT INTO versions_fts(rowid, search_text) SELECT id, search_text FROM versions "
                "WHERE id NOT IN (SELECT rowid FROM versions_fts)"
            )
        )
    elif dialect == "postgresql":
        conn.execute(
            text(
                "CREATE INDEX IF NOT EXISTS ix_versions_fts ON versions USING GIN (to_tsvector('english', search_text))"
            )
        )


def _m003_search_indexes(conn, dialect: str) -> None:
    # search joins packages on their latest version: without this index the join is quadratic
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_packages_latest ON packages (latest_version_id)"))
    # each sort order walks an index and stops after one page (ties broken by id, in the index too)
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_packages_downloads_id ON packages (downloads, id)"))
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_versions_score_id ON versions (score, id)"))


PG_TSV_INDEX = "CREATE INDEX IF NOT EXISTS ix_versions_tsv ON versions USING GIN (search_tsv)"


def _m004_pg_stored_tsvector(conn, dialect: str) -> None:
    # ranking needs each match's tsvector: store it (generated column) instead of re-parsing the text
    if dialect == "postgresql":
        conn.execute(
            text(
                "ALTER TABLE versions ADD COLUMN IF NOT EXISTS search_tsv tsvector "
                "GENERATED ALWAYS AS (to_tsvector('english', search_text)) STORED"
            )
        )
        conn.execute(text(PG_TSV_INDEX))
        conn.execute(text("DROP INDEX IF EXISTS ix_versions_fts"))


def add_column(conn, dialect: str, table: str, name: str, ddl: str) -> None:
    """``ALTER TABLE table ADD COLUMN name ddl`` unless the column exists (databases made by releases whose
    ``001_schema`` was ``create_all`` of the models of the day may already have it)."""
    if dialect == "sqlite":
        have = {r[1] for r in conn.execute(text(f"PRAGMA table_info({table})"))}
    else:
        have = {
            r[0]
            for r in conn.execute(
                text("SELECT column_name FROM information_schema.columns WHERE table_name = :t"), {"t": table}
            )
        }
    if name not in have:
        conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {ddl}"))


def _m005_search_at_scale(conn, dialect: str) -> None:
    # the verified filter: a flag per version, filled from the badge (search.fill_verified) through a
    # partial index of the rows still lacking it
    add_column(conn, dialect, "versions", "verified", "BOOLEAN")
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_versions_unverified ON versions (id) WHERE verified IS NULL"))
    if dialect == "postgresql":
        # "score DESC NULLS LAST" cannot walk an ascending (score, id) index backwards (NULLs would come
        # first): without this index a score sort reads every match and sorts it
        conn.execute(
            text("CREATE INDEX IF NOT EXISTS ix_versions_score_desc ON versions (score DESC NULLS LAST, id DESC)")
        )
        conn.execute(text("ANALYZE versions"))


def _m006_yank_and_version_downloads(conn, dialect: str) -> None:
    add_column(conn, dialect, "versions", "yanked", "BOOLEAN NOT NULL DEFAULT false")
    add_column(conn, dialect, "versions", "yanked_reason", "TEXT NOT NULL DEFAULT ''")
    add_column(conn, dialect, "versions", "downloads", "BIGINT NOT NULL DEFAULT 0")
    # versions of a package, newest first: the versions listing and re-pointing "latest" after a yank
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_versions_package_id ON versions (package_id, id)"))


WEIGHTS = "adapter/adapter_model.safetensors"


def _m007_download_on_weights(conn, dialect: str) -> None:
    # a download is counted when the adapter's weights are served, which a client does only after its own
    # checks (trusted key, licence, yank, base, chat template) passed: a refused pull counts nothing
    import json

    add_column(conn, dialect, "versions", "weights_digest", "VARCHAR(80)")
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_versions_weights ON versions (weights_digest)"))
    rows = conn.execute(text("SELECT id, manifest FROM versions WHERE weights_digest IS NULL")).all()
    for vid, manifest in rows:
        m = json.loads(manifest) if isinstance(manifest, str) else manifest
        digest = next((f.get("digest") for f in (m or {}).get("files", []) if f.get("path") == WEIGHTS), None)
        if digest:
            conn.execute(text("UPDATE versions SET weights_digest = :d WHERE id = :id"), {"d": digest, "id": vid})


def _m008_pg_inline_tsvector(conn, dialect: str) -> None:
    # a version row (search text + its ~1.3 KB tsvector) is just over PostgreSQL's 2 KB toast target, so
    # the tsvector went out of line and every row a relevance scan tested cost a TOAST index lookup (three
    # buffers a row, 16 ms for a two-word query at 100,000 packages); keep rows up to a page inline. Rows
    # written before this migration move inline when next rewritten (or by VACUUM FULL).
    if dialect == "postgresql":
        conn.execute(text("ALTER TABLE versions SET (toast_tuple_target = 8160)"))


PG_LEXEMES_FILL = (
    "INSERT INTO search_lexemes (word) SELECT DISTINCT unnest(tsvector_to_array(search_tsv)) FROM versions "
    "ON CONFLICT DO NOTHING"
)


def _m009_pg_search_lexemes(conn, dialect: str) -> None:
    # every lexeme of the full-text index, so that a prefix is expanded into the lexemes it stands for (a
    # B-tree range) and searched as exact GIN terms: GIN's own partial match of ``word:*`` costs 5-7x
    if dialect == "postgresql":
        conn.execute(text('CREATE TABLE IF NOT EXISTS search_lexemes (word TEXT COLLATE "C" PRIMARY KEY)'))
        conn.execute(text(PG_LEXEMES_FILL))


MIGRATIONS: list[tuple[str, Callable]] = [
    ("001_schema", _m001_schema),
    ("002_fulltext", _m002_fulltext),
    ("003_search_indexes", _m003_search_indexes),
    ("004_pg_stored_tsvector", _m004_pg_stored_tsvector),
    ("005_search_at_scale", _m005_search_at_scale),
    ("006_yank_and_version_downloads", _m006_yank_and_version_downloads),
    ("007_download_on_weights", _m007_download_on_weights),
    ("008_pg_inline_tsvector", _m008_pg_inline_tsvector),
    ("009_pg_search_lexemes", _m009_pg_search_lexemes),
]


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def migrate(engine: Engine, upto: str | None = None) -> list[str]:
    """Apply the named migrations not yet recorded (through ``upto`` when given), each in its own
    transaction with its record; returns the names applied now."""
    names = [n for n, _ in MIGRATIONS]
    if upto is not None and upto not in names:
        raise ValueError(f"no migration {upto!r}; known: {', '.join(names)}")
    dialect = engine.dialect.name
    with engine.begin() as conn:
        conn.execute(text(_ddl(dialect, MIGRATIONS_TABLE)))
        done = {r[0] for r in conn.execute(text("SELECT name FROM market_migrations"))}
    applied = []
    for name, fn in MIGRATIONS:
        if name not in done:
            with engine.begin() as conn:
                fn(conn, dialect)
                conn.execute(
                    text("INSERT INTO market_migrations (name, applied) VALUES (:n, :t)"), {"n": name, "t": _now()}
                )
            applied.append(name)
        if name == upto:
            break
    return applied
