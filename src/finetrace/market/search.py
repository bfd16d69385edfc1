"""Package search served from indexes, on SQLite and PostgreSQL alike.

Every query is one of two shapes, so that its cost is bounded by a page (or a candidate set), not by the
size of the catalogue:

* **sorted by downloads, recency or score**: the planner walks the sort order's index
  (``ix_packages_downloads_id``, the versions primary key, ``ix_versions_score_desc``/``_id``) and stops
  after a page of rows that pass the filters; a text query is then a lookup in the full-text index
  (FTS5 rowid set on SQLite, the GIN-indexed ``search_tsv`` on PostgreSQL).
* **ranked by relevance**: the full-text index yields at most ``CANDIDATES`` matches that pass every
  filter (bounded candidate set), which are ranked (``bm25`` on SQLite, ``ts_rank`` on PostgreSQL) and
  paged. A term matching a million packages costs the same as one matching a thousand; the price is
  that ranking covers the first ``CANDIDATES`` matches found, not all of them.

Pagination is by keyset: each answer carries ``next`` (an opaque cursor holding the last row's sort key
and id) while more rows exist; ``cursor=next`` continues strictly after it, so a page never repeats or
skips a row when packages are published between calls. ``explain(reg, **query)`` returns the database's
plan for a query (tests assert it uses the indexes).
"""

from __future__ import annotations

import base64
import functools
import json
import re

from sqlalchemy import (
    BigInteger,
    Float,
    Integer,
    and_,
    bindparam,
    cast,
    exists,
    func,
    literal_column,
    or_,
    select,
    table,
    tuple_,
)
from sqlalchemy.dialects.postgresql import TSQUERY

from . import db
from .checks import Refused

CANDIDATES = 200  # matches ranked per relevance query (bounded candidate set)
DENSE = 2000  # SQLite: a text match with more rows than this walks the sort index instead of sorting them
SORTS = ("relevance", "downloads", "recent", "score")
KEYS = (
    "ref",
    "namespace",
    "name",
    "version",
    "description",
    "license",
    "domains",
    "tasks",
    "base_name",
    "base_digest",
    "score",
    "downloads",
    "created",
    "publisher",
    "verified",
)


def parse_metric_filter(cond: str) -> tuple[str, str, float]:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*(>=|<=|>|<|=)\s*(-?[0-9.]+(?:e-?\d+)?)\s*", cond)
    if not m:
        raise Refused(f"bad metric filter {cond!r}", field="--min-metric", hint="e.g. accuracy>=0.9")
    return m.group(1), m.group(2), float(m.group(3))


def encode_cursor(sort: str, values: list) -> str:
    return base64.urlsafe_b64encode(json.dumps([sort, *values]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, sort: str) -> list:
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if (
            not isinstance(raw, list)
            or raw[0] != sort
            or len(raw) != {"relevance": 3, "downloads": 3, "recent": 2, "score": 3}[sort]
        ):
            raise ValueError
        return raw[1:]
    except (ValueError, TypeError, KeyError, IndexError):
        raise Refused(
            f"bad cursor {cursor[:40]!r} for sort {sort!r}",
            field="cursor",
            hint="pass the `next` value of the previous page, with the same query and sort",
        ) from None


OPS = (">=", ">", "<=", "<", "=")


PREFIX_LEXEMES = 64  # a prefix standing for more lexemes than this stays a GIN partial match


def pg_tsquery(conn, query_text: str) -> str:
    """The tsquery (as text) of a PostgreSQL search: ``to_tsquery('english', ...)`` of the words, with the
    last word's prefix expanded into the lexemes of ``search_lexemes`` it begins (exact GIN terms: a GIN
    partial match of ``word:*`` cost 12-23 ms at 100,000 packages, the exact terms about 3 ms). A prefix
    of no known lexeme, or of more than ``PREFIX_LEXEMES``, stays a partial match (same answers)."""
    tsq = conn.exec_driver_sql("SELECT to_tsquery('english', %(q)s)::text", {"q": query_text}).scalar() or ""
    m = re.search(r"'((?:[^']|'')*)':\*$", tsq)
    if not m:
        return tsq
    prefix = m.group(1).replace("''", "'")
    words = (
        conn.exec_driver_sql(
            "SELECT word FROM search_lexemes WHERE word >= %(p)s AND word < %(hi)s ORDER BY word LIMIT %(n)s",
            {"p": prefix, "hi": prefix + "\U0010ffff", "n": PREFIX_LEXEMES + 1},
        )
        .scalars()
        .all()
    )
    if not words or len(words) > PREFIX_LEXEMES:
        return tsq
    alternatives = " | ".join("'" + w.replace("'", "''") + "'" for w in words)
    return tsq[: m.start()] + f"( {alternatives} )"


def fts5_match(terms: list[str]) -> str:
    """The FTS5 query of a search's words: all of them, the last as a prefix (see ``search``)."""
    return " ".join([*(f'"{t}"' for t in terms[:-1]), f'"{terms[-1]}"*'])


def _plan(
    dialect: str,
    query: str = "",
    domain=None,
    task=None,
    base=None,
    license=None,
    min_metric=(),
    sort=None,
    limit: int = 20,
    offset: int = 0,
    verified=None,
    cursor: str | None = None,
    dense: bool = False,
) -> tuple[tuple, dict, str, int]:
    """(shape, bound values, sort, limit) of a search: the shape decides the SQL (one statement per shape,
    built once: ``_compose``), the values are bound to it. Raises ``Refused`` on a bad sort, filter or cursor."""
    sort = sort or ("relevance" if query.strip() else "recent")
    if sort not in SORTS:
        raise Refused(f"unknown sort {sort!r}", field="sort", hint="downloads, recent, score or relevance")
    limit = max(1, min(int(limit), 100))
    terms = re.findall(r"\w+", query.lower())
    if sort == "relevance" and (not terms or dialect not in ("sqlite", "postgresql")):
        sort = "recent"  # nothing to rank by
    values: dict = {"lim": limit + 1}
    base_kind = None
    if domain:
        values["domain"] = f"%,{domain.strip().lower()},%"
    if task:
        values["task"] = f"%,{task.strip().lower()},%"
    if base:
        values["base_name"] = base
        base_kind = "name"
        if re.fullmatch(r"(sha256:)?[0-9a-f]{6,64}", base):
            values["base_like"], base_kind = f"sha256:{base.split(':')[-1]}%", "digest"
    if license:
        values["license"] = license
    ops = []
    for i, cond in enumerate(min_metric or ()):
        name, op, value = parse_metric_filter(cond)
        ops.append(op)
        values[f"m{i}_name"], values[f"m{i}_value"] = name, value
    if terms:
        if dialect == "sqlite":
            values["match"] = fts5_match(terms)
        elif dialect == "postgresql":  # to_tsquery syntax; ``pg_tsquery`` turns it into the bound tsquery
            values["tsq"] = " & ".join([*terms[:-1], f"{terms[-1]}:*"])
        else:
            values.update({f"t{i}": f"%{t}%" for i, t in enumerate(terms)})
    after_kind = None
    if cursor:
        after = decode_cursor(cursor, sort)
        values.update({f"a{i}": v for i, v in enumerate(after)})
        after_kind = "null_score" if sort == "score" and after[0] is None else "after"
    use_offset = bool(offset) and not cursor
    if use_offset:
        values["off"] = int(offset)
        if sort == "relevance":
            values["lim_page"] = limit + 1 + int(offset)
    elif sort == "relevance":
        values["lim_page"] = limit + 1
    shape = (
        dialect,
        sort,
        len(terms) if dialect not in ("sqlite", "postgresql") else bool(terms),
        bool(domain),
        bool(task),
        base_kind,
        bool(license),
        verified,
        tuple(ops),
        after_kind,
        use_offset,
        bool(dense) and dialect == "sqlite",
    )
    return shape, values, sort, limit


def _filters(shape: tuple) -> list:
    _, _, _, domain, task, base_kind, license, verified, ops, *_ = shape
    V = db.Version
    conds = []
    if domain:
        conds.append(V.domains.like(bindparam("domain")))
    if task:
        conds.append(V.tasks.like(bindparam("task")))
    if base_kind == "digest":
        conds.append(or_(V.base_digest.like(bindparam("base_like")), V.base_name == bindparam("base_name")))
    elif base_kind == "name":
        conds.append(V.base_name == bindparam("base_name"))
    if license:
        conds.append(V.license_id == bindparam("license"))
    if verified is not None:
        conds.append(V.verified.is_(True) if verified else or_(V.verified.is_(False), V.verified.is_(None)))
    for i, op in enumerate(ops):
        col, value = db.Metric.value, bindparam(f"m{i}_value", type_=Float)
        cmp = {">=": col >= value, ">": col > value, "<=": col <= value, "<": col < value, "=": col == value}[op]
        conds.append(exists().where(db.Metric.version_id == V.id, db.Metric.name == bindparam(f"m{i}_name"), cmp))
    return conds


def _text(shape: tuple):
    """(match condition, rank expression or None) for the words of the query (the last one a prefix)."""
    dialect, terms = shape[0], shape[2]
    if not terms:
        return None, None
    V = db.Version
    if dialect == "sqlite":
        fts = literal_column("versions_fts")
        return fts.op("MATCH")(bindparam("match")), func.bm25(fts)
    if dialect == "postgresql":
        tsq = cast(bindparam("tsq"), TSQUERY)  # the text of a tsquery made by ``pg_tsquery``
        vec = literal_column("versions.search_tsv")  # stored tsvector (migration 004), GIN-indexed
        return vec.op("@@")(tsq), func.ts_rank(vec, tsq)
    return and_(*[V.search_text.ilike(bindparam(f"t{i}")) for i in range(terms)]), None


@functools.lru_cache(maxsize=512)
def _compose(shape: tuple):
    """The statement of a search shape (see ``_plan``), with its values as bind parameters."""
    dialect, sort = shape[0], shape[1]
    after_kind, use_offset, dense = shape[-3], shape[-2], shape[-1]
    V, P, N = db.Version, db.Package, db.Namespace
    cols = [
        V.ref,
        N.name,
        P.name,
        V.version,
        V.description,
        V.license_id,
        V.domains,
        V.tasks,
        V.base_name,
        V.base_digest,
        V.score,
        P.downloads,
        V.created,
        V.publisher,
        V.verified,
    ]
    conds = _filters(shape)
    match, rank = _text(shape)
    a1 = bindparam("a1", type_=Integer)
    if sort == "relevance":
        cand = select(V.id.label("id"), P.id.label("pid"), rank.label("rank")).join(P, P.latest_version_id == V.id)
        if dialect == "sqlite":
            cand = cand.select_from(table("versions_fts")).where(literal_column("versions_fts.rowid") == V.id)
        # the column filters first: PostgreSQL evaluates equally cheap conditions in the order written, and
        # a row's tsvector (often TOASTed) is then read only for rows that passed them
        cand = cand.where(*conds, match).limit(CANDIDATES).subquery("cand")
        # bm25 is lower-is-better, ts_rank higher-is-better: order so that the best comes first
        key = cand.c.rank if dialect == "sqlite" else -cand.c.rank
        # the page is cut from the candidates before any other table is read, and the rows of the page are
        # then fetched by primary key (joining the candidates back on latest_version_id made PostgreSQL
        # hash-join them against every package)
        page = select(cand.c.id, cand.c.pid, key.label("k")).select_from(cand)
        if after_kind:
            page = page.where(tuple_(key, cand.c.id) > tuple_(bindparam("a0", type_=Float), a1))
        page = page.order_by(key, cand.c.id).limit(bindparam("lim_page", type_=Integer)).subquery("page")
        q = (
            select(*cols, page.c.k, V.id)
            .select_from(page)
            .join(V, V.id == page.c.id)
            .join(P, P.id == page.c.pid)
            .join(N, N.id == P.namespace_id)
            .order_by(page.c.k, V.id)
        )
    else:
        q = select(*cols, P.id, V.id).join(P, P.latest_version_id == V.id).join(N, N.id == P.namespace_id).where(*conds)
        if match is not None:
            if dialect == "sqlite":
                ids = select(literal_column("rowid", Integer)).select_from(table("versions_fts")).where(match)
                # many matches: walk the sort order's index and look each row up in the match set
                # (``id + 0`` keeps the planner from driving the join from the set and sorting it all)
                q = q.where((V.id + 0).in_(ids) if dense else V.id.in_(ids))
            else:
                q = q.where(match)
        if sort == "downloads":
            q = q.order_by(P.downloads.desc(), P.id.desc())
            if after_kind:
                q = q.where(tuple_(P.downloads, P.id) < tuple_(bindparam("a0", type_=BigInteger), a1))
        elif sort == "recent":  # version ids grow with commit time; the primary key is the index
            q = q.order_by(V.id.desc())
            if after_kind:
                q = q.where(V.id < bindparam("a0", type_=Integer))
        else:
            # NULL scores last on both databases (SQLite sorts NULLs lowest, so DESC puts them last)
            q = q.order_by(V.score.desc() if dialect == "sqlite" else V.score.desc().nulls_last(), V.id.desc())
            s = bindparam("a0", type_=Float)
            if after_kind == "after":
                q = q.where(or_(V.score.is_(None), V.score < s, and_(V.score == s, V.id < a1)))
            elif after_kind == "null_score":
                q = q.where(and_(V.score.is_(None), V.id < a1))
    q = q.limit(bindparam("lim", type_=Integer))
    if use_offset:
        q = q.offset(bindparam("off", type_=Integer))
    return q


# a row's cursor key, by sort: (rank, id), (downloads, package id), (version id), (score, id)
CURSOR_KEY = {
    "relevance": lambda r: [r[-2], r[-1]],
    "downloads": lambda r: [r[11], r[-2]],
    "recent": lambda r: [r[-1]],
    "score": lambda r: [r[10], r[-1]],
}


def build(
    dialect: str,
    query: str = "",
    domain=None,
    task=None,
    base=None,
    license=None,
    min_metric=(),
    sort=None,
    limit: int = 20,
    offset: int = 0,
    verified=None,
    cursor: str | None = None,
    dense: bool = False,
):
    """(SQL statement, bound values, sort, limit, cursor key of a row) for a search; see ``search``.
    ``dense``: on SQLite, the text matches more than ``DENSE`` rows (the planner cannot know it of a
    virtual table). The statement is built once per shape of query and reused with new values."""
    shape, values, sort, limit = _plan(
        dialect, query, domain, task, base, license, min_metric, sort, limit, offset, verified, cursor, dense
    )
    return _compose(shape), values, sort, limit, CURSOR_KEY[sort]


def search(
    reg,
    query: str = "",
    domain: str | None = None,
    task: str | None = None,
    base: str | None = None,
    license: str | None = None,
    min_metric: list[str] = (),
    sort: str | None = None,
    limit: int = 20,
    offset: int = 0,
    verified: bool | None = None,
    cursor: str | None = None,
) -> dict:
    """Packages (their latest version that is not yanked) matching the text and filters.

    ``query``: words, all of which must match; the last is matched as a prefix (search as you type, the
    default of search services such as Algolia: a prefix term is a partial-match scan of the full-text
    index, 5-7x the cost of an exact term on PostgreSQL's GIN); ``domain``/``task``: one tag; ``base``: base model name or
    digest (prefix); ``license``: SPDX id; ``min_metric``: ``["accuracy>=0.9", ...]``; ``verified``: only
    packages whose badge is ``verified`` (True) or is not (False); ``sort``: relevance (default with a
    query), recent (default without), downloads or score; ``cursor``: ``next`` of the previous page.
    Returns ``{"results", "more", "sort", "next"}``. Raises ``Refused`` on a bad sort, filter or cursor.
    """
    if verified is not None:
        fill_verified(reg)
    dense = reg.dialect == "sqlite" and _dense(reg, query, sort)
    q, values, sort, limit, extra = build(
        reg.dialect, query, domain, task, base, license, min_metric, sort, limit, offset, verified, cursor, dense
    )
    with _reader(reg).connect() as conn:
        if "tsq" in values:
            values["tsq"] = pg_tsquery(conn, values["tsq"])
        rows = conn.execute(q, values).all()
    results = []
    for r in rows[:limit]:
        d = dict(zip(KEYS, r))
        d["domains"] = [x for x in d["domains"].split(",") if x]
        d["tasks"] = [x for x in d["tasks"].split(",") if x]
        d["created"] = d["created"].isoformat()
        d["verified"] = bool(d["verified"])
        results.append(d)
    more = len(rows) > limit
    nxt = encode_cursor(sort, extra(rows[limit - 1])) if more else None
    return {"results": results, "more": more, "sort": sort, "next": nxt}


def _reader(reg):
    """The registry's engine for searches: Core (no ORM session) and autocommit, so that a search is one
    round trip to the database (no BEGIN/ROLLBACK around its single read-only statement)."""
    eng = getattr(reg, "_search_engine", None)
    if eng is None:
        eng = reg._search_engine = reg.engine.execution_options(isolation_level="AUTOCOMMIT")
    return eng


def _dense(reg, query: str, sort: str | None) -> bool:
    """Whether a SQLite text match has more than ``DENSE`` rows (counting stops there: bounded)."""
    terms = re.findall(r"\w+", query.lower())
    if not terms or (sort or "relevance") == "relevance":
        return False
    match, _ = _text(("sqlite", None, True))
    inner = (
        select(literal_column("1"))
        .select_from(table("versions_fts"))
        .where(match)
        .limit(bindparam("lim", type_=Integer))
        .subquery()
    )
    values = {"match": fts5_match(terms), "lim": DENSE + 1}
    with _reader(reg).connect() as conn:
        return conn.scalar(select(func.count()).select_from(inner), values) > DENSE


def explain(reg, **query) -> str:
    """The database's query plan for ``search(reg, **query)``, as text (EXPLAIN QUERY PLAN / EXPLAIN)."""
    if reg.dialect == "sqlite":
        query.setdefault("dense", _dense(reg, query.get("query", ""), query.get("sort")))
    q, values, *_ = build(reg.dialect, **query)
    comp = q.compile(reg.engine)
    bound = comp.construct_params(values)
    prefix = "EXPLAIN QUERY PLAN " if reg.dialect == "sqlite" else "EXPLAIN "
    with reg.engine.connect() as conn:
        if "tsq" in bound:
            bound["tsq"] = pg_tsquery(conn, bound["tsq"])
        params = bound if reg.dialect != "sqlite" else tuple(bound[k] for k in comp.positiontup)
        rows = conn.exec_driver_sql(prefix + str(comp), params).all()
    return "\n".join(str(r[-1]) for r in rows)


def fill_verified(reg, batch: int = 200) -> int:
    """Compute the ``verified`` flag of versions that lack one (new commits, and every version of a
    database upgraded by migration 005) from their badge; found through a partial index. Returns how many."""
    done = 0
    while True:
        with reg.Session() as s:
            ids = list(s.scalars(select(db.Version.id).where(db.Version.verified.is_(None)).limit(batch)))
        if not ids:
            return done
        for vid in ids:
            with reg.Session.begin() as s:
                v = s.get(db.Version, vid)
                info = {"manifest": v.manifest, "signature": v.signature}
                try:
                    level = reg.badge(info)["level"]
                except Exception:  # noqa: BLE001 - a badge that cannot be computed is not verified
                    level = "unverified"
                v.verified = level == "verified"
        done += len(ids)
