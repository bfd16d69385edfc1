"""Registry migrations: a database made with the first release's schema (``001_schema`` only) and holding
rows upgrades to the current schema with its rows intact and searchable; a database made by the migrations
has every column and index the models declare (a model change without a migration fails here). SQLite,
and PostgreSQL when ``FINETRACE_TEST_PG_URL`` is set."""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import create_engine, inspect, text

from finetrace.market import db, lifecycle
from finetrace.market.migrations import MIGRATIONS, migrate
from finetrace.market.registry import Registry, Settings

from .conftest import PG_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "postgresql":
        if not PG_URL:
            pytest.skip("FINETRACE_TEST_PG_URL is not set (scripts/start_postgres.sh prints one)")
        return db.create_database(PG_URL, "ft_migr_")
    return f"sqlite:///{tmp_path / 'registry.db'}"


def _first_release_rows(conn) -> None:
    """Rows as the first release wrote them: an account, a namespace, one package with two versions."""
    created = datetime(2026, 11, 1, 12, 0, 0)
    conn.execute(
        text("INSERT INTO accounts (id, name, token_hash, is_admin, created) VALUES (1, 'acme', :h, false, :c)"),
        {"h": "a" * 64, "c": created},
    )
    conn.execute(text("INSERT INTO namespaces (id, name, owner_id) VALUES (1, 'acme', 1)"))
    conn.execute(text("INSERT INTO namespace_keys (id, namespace_id, key_id, public_key) VALUES (1, 1, 'k1', 'pk')"))
    conn.execute(
        text(
            "INSERT INTO packages (id, namespace_id, name, downloads, latest_version_id) VALUES (1, 1, 'clauses', 7, 2)"
        )
    )
    for vid, ver in ((1, "1.0.0"), (2, "1.1.0")):
        conn.execute(
            text(
                "INSERT INTO versions (id, package_id, version, ref, manifest_digest, manifest, signature, key_id, "
                "description, license_id, base_name, base_digest, domains, tasks, score, search_text, publisher, "
                "created) VALUES (:id, 1, :v, :ref, :md, '{}', '{}', 'k1', 'contract clauses', 'MIT', 'tiny@1', "
                ":bd, ',legal,', ',classification,', 0.9, :st, 'acme', :c)"
            ),
            {
                "id": vid,
                "v": ver,
                "ref": f"acme/clauses@{ver}",
                "md": f"sha256:{vid:064x}",
                "bd": "sha256:" + "b" * 64,
                "st": f"acme clauses contract termination indemnity v{vid}",
                "c": created,
            },
        )
        conn.execute(text("INSERT INTO metrics (version_id, name, value) VALUES (:id, 'accuracy', 0.9)"), {"id": vid})


def test_first_schema_upgrades_with_its_data(url, tmp_path):
    engine = create_engine(url)
    assert migrate(engine, upto="001_schema") == ["001_schema"]
    with engine.begin() as conn:
        _first_release_rows(conn)
    assert "verified" not in {c["name"] for c in inspect(engine).get_columns("versions")}  # the old shape
    later = [name for name, _ in MIGRATIONS[1:]]
    assert migrate(engine) == later
    assert migrate(engine) == []  # nothing twice
    engine.dispose()

    reg = Registry(Settings(db_url=url, store=str(tmp_path / "store")))
    try:
        info = reg.version("acme", "clauses")
        assert (info["version"], info["downloads"], info["versions"]) == ("1.1.0", 7, ["1.0.0", "1.1.0"])
        assert info["yanked"] is False and info["yanked_reason"] == ""
        rows = lifecycle.versions(reg, "acme", "clauses")
        assert [(r["version"], r["downloads"], r["yanked"]) for r in rows] == [("1.1.0", 0, False), ("1.0.0", 0, False)]
        # the rows stored before the full-text index existed are found by it, and by the filters
        hits = reg.search("indemnity")["results"]
        assert [h["ref"] for h in hits] == ["acme/clauses@1.1.0"]
        assert [h["ref"] for h in reg.search(domain="legal", min_metric=["accuracy>=0.8"])["results"]] == [
            "acme/clauses@1.1.0"
        ]
        assert reg.search(verified=True)["results"] == []  # no valid signature in these rows: computed, not assumed
    finally:
        reg.close()


def test_migrated_schema_has_every_model_column_and_index(url):
    engine = create_engine(url)
    migrate(engine)
    insp = inspect(engine)
    for table in db.Base.metadata.sorted_tables:
        have = {c["name"]: c for c in insp.get_columns(table.name)}
        for col in table.columns:
            assert col.name in have, f"{table.name}.{col.name} is in the models but no migration adds it"
            nullable = bool(have[col.name]["nullable"])
            assert nullable == bool(col.nullable) or col.primary_key, (
                f"{table.name}.{col.name}: nullable {nullable} in the database, {col.nullable} in the model"
            )
        indexes = {ix["name"] for ix in insp.get_indexes(table.name)}
        for ix in table.indexes:
            assert ix.name in indexes, f"index {ix.name} is in the models but no migration creates it"
    engine.dispose()


def test_migrate_names_an_unknown_stop(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'r.db'}")
    with pytest.raises(ValueError, match="no migration '999_x'; known: 001_schema"):
        migrate(engine, upto="999_x")
    engine.dispose()
