"""The registry's database: SQLAlchemy 2 models, named migrations, and full-text search.

SQLite by default, PostgreSQL through a SQLAlchemy URL (``postgresql+psycopg://...``). Schema changes
are frozen, *named migrations* (``migrations.py``: the first is the first release's DDL written out, the
later ones plain functions), applied in order and recorded in ``market_migrations``. Full-text search uses
an FTS5 table on SQLite and, on PostgreSQL, a stored generated ``tsvector`` column with a GIN index.
"""

from __future__ import annotations

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

from .migrations import MIGRATIONS, PG_LEXEMES_FILL, PG_TSV_INDEX, add_column, migrate  # noqa: F401  (re-exported)


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
    # digest of adapter/adapter_model.safetensors: serving it is what counts a download (migration 007)
    weights_digest: Mapped[str | None] = mapped_column(String(80), nullable=True)
    __table_args__ = (
        UniqueConstraint("package_id", "version"),
        Index("ix_versions_created", "created"),
        Index("ix_versions_base", "base_digest"),
        Index("ix_versions_license", "license_id"),
        Index("ix_versions_score", "score"),
        Index("ix_versions_weights", "weights_digest"),
    )


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


def connect(url: str) -> tuple[Engine, sessionmaker]:
    """An engine (migrated) and a session factory for ``url``."""
    kwargs: dict = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    elif url.startswith("postgresql"):
        # psycopg prepares a statement run 5 times; PostgreSQL may then reuse one generic plan for every
        # value, and a search plan depends on the values (a rare word wants the GIN index, a frequent one a
        # walk of the sort order's index): plan each execution for its own values
        kwargs["connect_args"] = {"options": "-c plan_cache_mode=force_custom_plan"}
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
    """Put a version's search text into the full-text index (same transaction as the version row); on
    PostgreSQL (whose tsvector is a generated column) add its new lexemes to ``search_lexemes``."""
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        session.execute(
            text("INSERT INTO versions_fts(rowid, search_text) VALUES (:id, :t)"),
            {"id": version.id, "t": version.search_text},
        )
    elif dialect == "postgresql":
        session.execute(
            text(
                "INSERT INTO search_lexemes (word) SELECT unnest(tsvector_to_array(search_tsv)) FROM versions "
                "WHERE id = :id ON CONFLICT DO NOTHING"
            ),
            {"id": version.id},
        )
