"""Search at scale: the query plans use the indexes, keyset pages neither repeat nor skip, the verified
filter, and migration 005 upgrading a database made before it. A few thousand synthetic packages
(``bench/market_search.py``'s generator) on SQLite, and on PostgreSQL when ``FINETRACE_TEST_PG_URL`` is set."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from sqlalchemy import select, text

from finetrace.market import db
from finetrace.market.checks import Refused
from finetrace.market.registry import Registry, Settings
from finetrace.market.search import explain

from .conftest import PG_URL

N = 3000
BENCH = Path(__file__).resolve().parents[2] / "bench" / "market_search.py"


def _bench():
    spec = importlib.util.spec_from_file_location("market_search_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def catalog(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"catalog-{request.param}")
    if request.param == "postgresql":
        if not PG_URL:
            pytest.skip("FINETRACE_TEST_PG_URL is not set (scripts/start_postgres.sh prints one)")
        url = db.create_database(PG_URL, "ft_search_")
    else:
        url = f"sqlite:///{tmp / 'registry.db'}"
    reg = Registry(Settings(db_url=url, store=str(tmp / "store")))
    _bench().generate(reg, N)
    yield reg
    reg.close()


def _uses(plan: str, *names: str) -> None:
    for name in names:
        assert name in plan, f"{name} not in plan:\n{plan}"


def test_query_plans_use_the_indexes(catalog, monkeypatch):
    from finetrace.market import search

    monkeypatch.setattr(search, "DENSE", 100)  # "many matches" at this small size
    reg = catalog
    recent, downloads = explain(reg, sort="recent"), explain(reg, sort="downloads", domain="legal")
    score = explain(reg, sort="score", license="MIT")
    rare = explain(reg, query="t9000")  # a rare card term: the full-text index, then a bounded candidate set
    dense = explain(reg, query="contract", sort="downloads")  # a frequent word sorted by downloads
    if reg.dialect == "sqlite":
        for plan in (recent, downloads, score, dense):
            assert "TEMP B-TREE" not in plan, plan  # a page comes straight off an index, nothing is sorted
        _uses(downloads, "ix_packages_downloads_id")
        _uses(score, "ix_versions_score_id")
        _uses(dense, "ix_packages_downloads_id", "versions_fts VIRTUAL TABLE")
        _uses(rare, "versions_fts VIRTUAL TABLE", "CO-ROUTINE cand", "MATERIALIZE page")  # page cut from candidates
    else:
        _uses(recent, "Index Scan Backward using versions_pkey")
        _uses(downloads, "Index Scan Backward using ix_packages_downloads_id")
        _uses(score, "Index Scan using ix_versions_score_desc")
        _uses(rare, "Bitmap Index Scan on ix_versions_tsv", "Subquery Scan on cand")
        for plan in (recent, downloads, score):
            assert "Sort" not in plan, plan  # the index gives the order: nothing is sorted
        assert "Seq Scan on versions" not in recent + downloads + score + rare


def _all_pages(reg, **query) -> list[str]:
    refs, cursor, pages = [], None, 0
    while True:
        res = reg.search(**query, limit=37, cursor=cursor)
        refs += [r["ref"] for r in res["results"]]
        pages += 1
        if not res["more"]:
            assert res["next"] is None
            return refs
        cursor = res["next"]
        assert pages < 200


def test_keyset_pages_neither_repeat_nor_skip(catalog):
    reg = catalog
    with reg.Session() as s:
        rows = s.execute(
            select(
                db.Version.ref, db.Package.downloads, db.Package.id, db.Version.score, db.Version.id, db.Version.domains
            ).join(db.Package, db.Package.latest_version_id == db.Version.id)
        ).all()
    legal = [r for r in rows if ",legal," in r.domains]
    want_dl = [r.ref for r in sorted(legal, key=lambda r: (-r.downloads, -r[2]))]
    assert _all_pages(reg, domain="legal", sort="downloads") == want_dl
    want_score = [r.ref for r in sorted(legal, key=lambda r: (-(r.score if r.score is not None else -1), -r[4]))]
    assert _all_pages(reg, domain="legal", sort="score") == want_score
    assert _all_pages(reg, domain="legal", sort="recent") == [r.ref for r in sorted(legal, key=lambda r: -r[4])]
    # relevance: pages over the bounded candidate set, best first, each match once
    ranked = _all_pages(reg, query="invoice")
    assert len(ranked) == len(set(ranked)) > 0
    first = reg.search("invoice", limit=5)
    assert [r["ref"] for r in first["results"]] == ranked[:5]
    with pytest.raises(Refused, match="bad cursor"):
        reg.search(sort="downloads", cursor=first["next"])  # a relevance cursor for another sort


def test_a_prefix_finds_what_the_full_text_index_finds(catalog, monkeypatch):
    """PostgreSQL expands the last word's prefix into the lexemes it begins; the answers are those of the
    GIN partial match it replaces (forced here with PREFIX_LEXEMES = 0), page by page."""
    from finetrace.market import search

    reg = catalog
    queries = ["contr", "invoice paym", "t90", "radiolog", "zzqx", "ledger t1"]
    expanded = {q: _all_pages(reg, query=q) for q in queries}
    assert all(expanded[q] for q in ("contr", "invoice paym", "t90", "radiolog")) and expanded["zzqx"] == []
    if reg.dialect == "postgresql":
        with reg.engine.connect() as conn:
            assert pg_tsquery_has_alternatives(search.pg_tsquery(conn, "invoice & paym:*"))
            assert search.pg_tsquery(conn, "zzqx:*") == "'zzqx':*"  # no such lexeme: a partial match
        monkeypatch.setattr(search, "PREFIX_LEXEMES", 0)
        assert {q: _all_pages(reg, query=q) for q in queries} == expanded


def pg_tsquery_has_alternatives(tsq: str) -> bool:
    return tsq.startswith("'invoic' & ( ") and "'payment'" in tsq and ":*" not in tsq


def test_verified_filter_matches_the_flags(catalog):
    reg = catalog
    with reg.Session() as s:
        flags = dict(
            s.execute(select(db.Version.ref, db.Version.verified).where(db.Version.domains.like("%,medical,%"))).all()
        )
    got = _all_pages(reg, domain="medical", verified=True, sort="downloads")
    assert sorted(got) == sorted(ref for ref, v in flags.items() if v) and 0 < len(got) < len(flags)
    assert all(r["verified"] for r in reg.search(domain="medical", verified=True)["results"])


def test_migration_005_upgrades_an_older_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    reg = Registry(Settings(db_url=url, store=str(tmp_path / "store")))
    _bench().generate(reg, 50)
    with reg.engine.begin() as c:  # make it the database an older release left: no column, no 005
        c.execute(text("DROP INDEX ix_versions_unverified"))
        c.execute(text("ALTER TABLE versions DROP COLUMN verified"))
        c.execute(text("DELETE FROM market_migrations WHERE name = '005_search_at_scale'"))
    reg.close()
    assert db.migrate(db.connect(url)[0]) == []  # connect() itself applied 005
    reg = Registry(Settings(db_url=url, store=str(tmp_path / "store")))
    with reg.Session() as s:
        assert s.scalar(text("SELECT count(*) FROM versions WHERE verified IS NULL")) == 50
    # the flags are computed from the badge: synthetic packages carry no valid signature, so none verifies
    assert reg.search(verified=True)["results"] == []
    with reg.Session() as s:
        assert s.scalar(text("SELECT count(*) FROM versions WHERE verified = 0")) == 50
    assert len(reg.search(verified=False, limit=100)["results"]) == 50
    reg.close()
