"""The registry's database: SQLAlchemy 2 models, named migrations, and full-text search.

SQLite by default, PostgreSQL through a SQLAlchemy URL (``postgresql+psycopg://...``). Schema changes
are *named migrations* applied in order and recorded in ``market_migrations`` (no Alembic: the first
migration is ``create_all`` of the models below; later ones are plain functions). Full-text search uses
an FTS5 table on SQLite and, on PostgreSQL, a stored generated ``tsvector`` column with a GIN index.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str] = mapped_column(String(80), unique=True)  # sha256 hex of the API token
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Namespace(Base):
    __tablename__ = "namespaces"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))


class NamespaceKey(Base):
    """Publisher keys pinned to a namespace (the first key that publishes is pinned: trust on first use)."""
    __tablename__ = "namespace_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace_id: Mapped[int] = mapped_column(ForeignKey("namespaces.id"))
    key_id: Mapped[str] = mapped_column(String(80))
    public_key: Mapped[str] = mapped_column(String(100))
    __table_args__ = (UniqueConstraint("namespace_id", "key_id"),)


class Package(Base):
    __tablename__ = "packages"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace_id: Mapped[int] = mapped_column(ForeignKey("namespaces.id"))
    name: Mapped[str] = mapped_column(String(64))
    downloads: Mapped[int] = mapped_column(BigInteger, default=0)
    latest_version_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    __table_args__ = (UniqueConstraint("namespace_id", "name"), Index("ix_packages_downloads", "downloads"))


class Version(Base):
    __tablename__ = "versions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    package_id: Mapped[int] = mapped_column(ForeignKey("packages.id"))
    version: Mapped[str] = mapped_column(String(32))
    ref: Mapped[str] = mapped_column(String(200))  # ns/name@version
    manifest_digest: Mapped[str] = mapped_column(String(80))
    manifest: Mapped[dict] = mapped_column(JSON)
    signature: Mapped[dict] = mapped_column(JSON)
    key_id: Mapped[str] = mapped_column(String(80))
    description: Mapped[str] = mapped_column(Text, default="")
    license_id: Mapped[str] = mapped_column(String(64))
    base_name: Mapped[str] = mapped_column(String(200), default="")
    base_digest: Mapped[str] = mapped_column(String(80))
    domains: Mapped[str] = mapped_column(String(400), default="")  # ",legal,finance," for LIKE filters
    tasks: Mapped[str] = mapped_column(String(400), default="")
    score: Mapped[float | None] = mapped_column(Float, nullable=True)  # primary metric value
    search_text: Mapped[str] = mapped_column(Text, default="")
    publisher: Mapped[str] = mapped_column(String(64))
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # badge level "verified", computed once from the stored evidence (NULL: not computed yet; migration 005)
    verified: Mapped[bool | None] = mapped_column(Boolean, nullable=True, default=None)
    # yanked: still served and verifiable by exact version, never the default (migration 006)
    yanked: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    yanked_reason: Mapped[str] = mapped_column(Text, default="", server_default="")
    downloads: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # pulls of this version
    __table_args__ = (UniqueConstraint("package_id", "version"), Index("ix_versions_created", "created"),
                      Index("ix_versions_base", "base_digest"), Index("ix_versions_license", "license_id"),
                      Index("ix_versions_score", "score"))


class Metric(Base):
    __tablename__ = "metrics"
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[float] = mapped_column(Float)
    __table_args__ = (Index("ix_metrics_name_value", "name", "value"),)


class Upload(Base):
    """A publish in progress: visible to nobody until its commit succeeds."""
    __tablename__ = "uploads"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    ref: Mapped[str] = mapped_column(String(200))
    manifest_digest: Mapped[str] = mapped_column(String(80))
    manifest: Mapped[dict] = mapped_column(JSON)
    signature: Mapped[dict] = mapped_column(JSON)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    __table_args__ = (UniqueConstraint("ref", "manifest_digest"),)


class BaseModelShapes(Base):
    """Base models the registry knows: their tensor shape maps, which take precedence over a publisher's."""
    __tablename__ = "base_models"
    digest: Mapped[str] = mapped_column(String(80), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    shapes: Mapped[dict] = mapped_column(JSON)


class Migration(Base):
    __tablename__ = "market_migrations"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    applied: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


# -- migrations ----------------------------------------------------------------------------------
def _m001_schema(conn, dialect: str) -> None:
    Base.metadata.create_all(conn)


def _m002_fulltext(conn, dialect: str) -> None:
    if dialect == "sqlite":
        conn.execute(text("CREATE VIRTUAL TABLE IF NOT EXISTS versions_fts USING fts5(search_text, "
                          "tokenize='porter unicode61')"))
    elif dialect == "postgresql":
        conn.execute(text("CREATE INDEX IF NOT EXISTS ix_versions_fts ON versions "
                          "USING GIN (to_tsvector('english', search_text))"))


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
        conn.execute(text("ALTER TABLE versions ADD COLUMN IF NOT EXISTS search_tsv tsvector "
                          "GENERATED ALWAYS AS (to_tsvector('english', search_text)) STORED"))
        conn.execute(text(PG_TSV_INDEX))
        conn.execute(text("DROP INDEX IF EXISTS ix_versions_fts"))


def add_column(conn, dialect: str, table: str, name: str, ddl: str) -> None:
    """``ALTER TABLE table ADD COLUMN name ddl`` unless the column exists (a database created by
    ``001_schema`` from today's models already has it; one created by an older release does not)."""
    if dialect == "sqlite":
        have = {r[1] for r in conn.execute(text(f"PRAGMA table_info({table})"))}
    else:
        have = {r[0] for r in conn.execute(text("SELECT column_name FROM information_schema.columns "
                                                 "WHERE table_name = :t"), {"t": table})}
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
        conn.execute(text("CREATE INDEX IF NOT EXISTS ix_versions_score_desc ON versions "
                          "(score DESC NULLS LAST, id DESC)"))
        conn.execute(text("ANALYZE versions"))


def _m006_yank_and_version_downloads(conn, dialect: str) -> None:
    add_column(conn, dialect, "versions", "yanked", "BOOLEAN NOT NULL DEFAULT false")
    add_column(conn, dialect, "versions", "yanked_reason", "TEXT NOT NULL DEFAULT ''")
    add_column(conn, dialect, "versions", "downloads", "BIGINT NOT NULL DEFAULT 0")
    # versions of a package, newest first: the versions listing and re-pointing "latest" after a yank
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_versions_package_id ON versions (package_id, id)"))


MIGRATIONS: list[tuple[str, Callable]] = [("001_schema", _m001_schema), ("002_fulltext", _m002_fulltext),
                                          ("003_search_indexes", _m003_search_indexes),
                                          ("004_pg_stored_tsvector", _m004_pg_stored_tsvector),
                                          ("005_search_at_scale", _m005_search_at_scale),
                                          ("006_yank_and_version_downloads", _m006_yank_and_version_downloads)]


def migrate(engine: Engine) -> list[str]:
    """Apply the named migrations not yet recorded; returns the names applied now."""
    applied = []
    with engine.begin() as conn:
        Migration.__table__.create(conn, checkfirst=True)
        done = {r[0] for r in conn.execute(text("SELECT name FROM market_migrations"))}
    for name, fn in MIGRATIONS:
        if name in done:
            continue
        with engine.begin() as conn:
            fn(conn, engine.dialect.name)
            conn.execute(Migration.__table__.insert().values(name=name, applied=utcnow()))
        applied.append(name)
    return applied


def connect(url: str) -> tuple[Engine, sessionmaker]:
    """An engine (migrated) and a session factory for ``url``."""
    kwargs: dict = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _rec):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    migrate(engine)
    analyze(engine)
    return engine, sessionmaker(engine, expire_on_commit=False)


def create_database(admin_url: str, prefix: str = "finetrace_") -> str:
    """Create a new, empty PostgreSQL database (``prefix`` + random suffix) on the server of ``admin_url``
    and return its URL: tests and benchmarks never write into a database that already exists."""
    import secrets

    name = prefix + secrets.token_hex(4)
    eng = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    eng.dispose()
    return admin_url.rsplit("/", 1)[0] + "/" + name


def analyze(engine: Engine) -> None:
    """Refresh the SQLite planner's statistics (without them it sorts whole tables instead of walking an
    index for a page of search results). PostgreSQL's autovacuum keeps its own statistics."""
    if engine.dialect.name == "sqlite":
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")


def index_text(session, version: Version) -> None:
    """Put a version's search text into the full-text index (same transaction as the version row)."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(text("INSERT INTO versions_fts(rowid, search_text) VALUES (:id, :t)"),
                        {"id": version.id, "t": version.search_text})
