"""Pass 1 of an import, one Arrow record batch at a time: validate, normalise, scan for PII, hash.

``process(chunk, ctx) -> Cleaned`` is a pure function of a chunk of input (JSONL bytes, an Arrow table
from Parquet, or already-read records), so it runs in the importer's process or in a worker process
alike. Rows the vectorised checks cannot settle (a wrong type, an empty field, invalid JSON, a byte
that is not UTF-8) go through the per-row reference path (``validate.RowValidator``, ``readers``) so
their errors keep the same file, line, field and wording. Results are bit-identical to running the
per-row functions on every row: same normalised text, same PII spans, same 64-bit keys and MinHash
sketches, so dataset digests do not depend on which path a row took.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ..errors import InputError
from . import pii as piimod
from .arrowtext import (
    WS_OR_HIGH,
    blake64,
    edge_bytes,
    normalize_array,
    np_bools,
    np_ints,
    null_mask,
    pa_strings,
    rows_with,
    str_buffers,
    str_scalar,
)
from .clean import MinHasher, exact_key, normalize_row, normalize_text, text_fields
from .readers import ReadOptions, RowError, jsonl_rows
from .schemas import OPTIONAL_COLUMNS, SCHEMAS
from .validate import RowValidator

TEXT_FIELDS = ("prompt", "completion", "text", "chosen", "rejected")
KEEP_COLUMNS = ("label", "group", "id")  # what the importer reads of kept rows before writing them out
MAX_EXAMPLES = 20


@dataclass
class Ctx:
    """What processing a chunk needs (picklable, sent once to each worker)."""

    schema: str
    fmap: dict
    pii: str
    threshold: float
    max_row_bytes: int
    detector_keys: list | None = None  # None: every registered detector (workers: the built-ins)
    row_hook: object = None  # a picklable callable(record) -> record | RowError (a format's mapping)
    tools: bool = False  # chat rows with tool calls, tool role and weights (formats.py)
    spill: str | None = None  # a scratch folder: kept rows go to an Arrow file there, not back over a pipe
    compiled: bool = False  # MinHash by the numba loops when installed (``compiled``): the same numbers


@dataclass
class Chunk:
    kind: str  # "jsonl" (bytes), "table" (Arrow IPC bytes), "records" [(line, rec, err)]
    first_line: int
    offset: int
    payload: object
    seq: int = 0  # position among all chunks of an import (names its spill file)
    source: str | None = None  # a plain (uncompressed) file holding ``payload`` at ``offset``
    size: int = 0  # bytes of ``payload``

    def by_reference(self) -> Chunk:
        """This chunk without its bytes when they can be read back from ``source`` (a worker process
        reads them from the page cache instead of through a pipe)."""
        if self.kind != "jsonl" or self.source is None:
            return self
        return Chunk(self.kind, self.first_line, self.offset, None, self.seq, self.source, self.size)

    def bytes(self) -> bytes:
        if self.payload is None:  # sent by reference
            with open(self.source, "rb") as fh:  # type: ignore[arg-type]
                fh.seek(self.offset)
                self.payload = fh.read(self.size)
            if len(self.payload) != self.size:
                raise InputError(f"the file changed while it was read ({self.size} bytes expected)", file=self.source)
        return self.payload


@dataclass
class Cleaned:
    table: pa.Table | None  # rows kept, in arrow_schema(schema) column order
    lines: np.ndarray  # int64 (n,) line (or row) of each kept row
    keys: np.ndarray  # uint64 (n,) exact keys
    sketch: np.ndarray  # uint8 (n, P)
    bands: np.ndarray  # uint64 (n, B)
    errors: list = field(default_factory=list)  # [(line, RowError)] in line order
    rows_read: int = 0
    normalized: int = 0
    pii_counts: dict = field(default_factory=dict)
    pii_rows: int = 0
    pii_examples: list = field(default_factory=list)  # [(line, field, "type, type")]
    extra: set = field(default_factory=set)
    spilled: str | None = None  # the Arrow file holding the kept rows; ``table`` then keeps only KEEP_COLUMNS

    def spill(self, path: str) -> Cleaned:
        """Write the kept rows to the Arrow IPC file ``path``; keep only the small columns in memory."""
        if self.table is not None and self.table.num_rows:
            with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, self.table.schema) as w:
                w.write_table(self.table)
            self.spilled = path
            self.table = self.table.select([c for c in KEEP_COLUMNS if c in self.table.column_names])
        return self

    def ipc(self) -> Cleaned:  # tables travel between processes as Arrow IPC bytes
        if isinstance(self.table, pa.Table):
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, self.table.schema) as w:
                w.write_table(self.table)
            self.table = sink.getvalue().to_pybytes()
        return self

    def arrow(self) -> pa.Table | None:
        if isinstance(self.table, (bytes, bytearray)):
            self.table = pa.ipc.open_stream(self.table).read_all()
        return self.table


_STATE: dict = {}


def _minhasher(ctx: Ctx) -> MinHasher:
    key = ("mh", ctx.threshold, ctx.compiled)
    if key not in _STATE:
        _STATE[key] = MinHasher(ctx.threshold, None, compiled=ctx.compiled)
    return _STATE[key]


def arrow_schema(schema: str, tools: bool = False) -> pa.Schema:
    """Columns of a dataset's Parquet files; ``tools``: chat messages with tool calls, ids and weights."""
    s = pa.string()
    if schema == "chat" and tools:
        msg = pa.struct(
            [("role", s), ("content", s), ("tool_calls", s), ("tool_call_id", s), ("name", s), ("weight", pa.int8())]
        )
        return pa.schema([("messages", pa.list_(msg)), ("tools", s)] + [(c, s) for c in OPTIONAL_COLUMNS])
    cols = {
        "completion": [("prompt", s), ("completion", s)],
        "classification": [("text", s), ("label", s)],
        "preference": [("prompt", s), ("chosen", s), ("rejected", s)],
        "chat": [("messages", pa.list_(pa.struct([("role", s), ("content", s)])))],
    }[schema]
    return pa.schema(cols + [(c, s) for c in OPTIONAL_COLUMNS])


# -- validation ---------------------------------------------------------------------------------
def process(chunk: Chunk, ctx: Ctx, for_worker: bool = False) -> Cleaned:
    """Validate and clean one chunk; see the module docstring."""
    validator = RowValidator(ctx.schema, ctx.fmap, ctx.tools)
    if chunk.kind == "jsonl":
        rows, lines, errors, extra, n = _jsonl(chunk, ctx, validator)
    elif chunk.kind == "table":
        table = pa.ipc.open_stream(chunk.payload).read_all() if isinstance(chunk.payload, bytes) else chunk.payload
        lines = np.arange(chunk.first_line, chunk.first_line + table.num_rows, dtype=np.int64)
        rows, lines, errors, extra = _table(table, lines, ctx, validator, lambda i: table.slice(i, 1).to_pylist()[0])
        n = table.num_rows
    else:
        rows, lines, errors, extra = _records(chunk.payload, validator, ctx)
        n = len(chunk.payload)
    out = _clean(rows, lines, ctx)
    out.errors = sorted(errors + out.errors, key=lambda e: e[0])
    out.rows_read = n
    out.extra = extra | validator.dropped
    if ctx.spill is not None:
        out.spill(f"{ctx.spill}/rows-{chunk.seq:09d}.arrow")
    return out.ipc() if for_worker else out


def _records(items, validator: RowValidator, ctx: Ctx):
    """The per-row reference path: (line, record, error) tuples through the RowValidator."""
    good, lines, errors = [], [], []
    for line, rec, err in items:
        if err is None and ctx.row_hook is not None:
            rec = ctx.row_hook(rec)
            if isinstance(rec, RowError):
                rec, err = None, rec
        if err is None:
            rec, err = validator.check(rec)
        if err is not None:
            errors.append((line, err))
        else:
            good.append(rec)
            lines.append(line)
    table = pa.Table.from_pylist(good, schema=arrow_schema(ctx.schema, ctx.tools))
    return table, np.asarray(lines, np.int64), errors, set()


def _jsonl(chunk: Chunk, ctx: Ctx, validator: RowValidator):
    """A block of whole JSONL lines: parsed by Arrow when every line is a plain object of consistent
    types, else line by line (the reference reader), which also names each bad line."""
    buf: bytes = chunk.bytes()
    arr = np.frombuffer(buf, np.uint8)
    nl = np.flatnonzero(arr == 10)
    starts = np.concatenate([[0], nl + 1])
    ends = np.concatenate([nl + 1, [len(buf)]])
    if starts[-1] >= len(buf):
        starts, ends = starts[:-1], ends[:-1]
    lens = ends - starts
    table = None
    if ctx.row_hook is None and ctx.schema != "chat" and (not len(lens) or lens.max() <= ctx.max_row_bytes):
        blankish = np.flatnonzero(WS_OR_HIGH[arr[starts]]) if len(starts) else starts
        blank = {int(i) for i in blankish if not buf[starts[i] : ends[i]].decode("utf-8", "replace").strip()}
        keep = np.ones(len(starts), bool)
        keep[sorted(blank)] = False
        try:
            import pyarrow.json as pj

            if (arr >= 0x80).any():
                buf.decode("utf-8")  # Arrow's JSON reader does not check the bytes inside strings
            table = pj.read_json(  # from the bytes themselves (a BytesIO is read through Python, copied)
                pa.BufferReader(buf),
                read_options=pj.ReadOptions(use_threads=False, block_size=max(len(buf) + 1, 1 << 16)),
            )
        except (pa.ArrowInvalid, UnicodeDecodeError, ValueError):
            table = None
        if table is not None and table.num_rows == int(keep.sum()):
            lines = chunk.first_line + np.flatnonzero(keep).astype(np.int64)
            kept_starts, kept_ends = starts[keep], ends[keep]

            def record(i: int):  # the i-th parsed row, read again by the per-row reader
                a, b = int(kept_starts[i]), int(kept_ends[i])
                items = list(
                    jsonl_rows(
                        io.BufferedReader(io.BytesIO(buf[a:b])),
                        ReadOptions(ctx.max_row_bytes),
                        int(lines[i]),
                        chunk.offset + a,
                    )
                )
                return items[0] if items else (int(lines[i]), None, RowError("invalid_json", "blank"))

            rows, lines, errors, extra = _table(table, lines, ctx, validator, record, whole=True)
            return rows, lines, errors, extra, table.num_rows
    items = list(
        jsonl_rows(io.BufferedReader(io.BytesIO(buf)), ReadOptions(ctx.max_row_bytes), chunk.first_line, chunk.offset)
    )
    rows, lines, errors, extra = _records(items, validator, ctx)
    return rows, lines, errors, extra, len(items)


def _table(table: pa.Table, lines: np.ndarray, ctx: Ctx, validator: RowValidator, record, whole=False):
    """Vectorised checks of a parsed table; rows they reject are re-checked one by one (``record(i)``
    gives the row as the per-row path sees it: a dict, or a (line, record, error) tuple)."""
    cols = _mapped(table, ctx.fmap) if ctx.row_hook is None else None
    ok = _fast_ok(cols, table.num_rows, ctx.schema) if cols is not None else None
    if ok is None:  # types the fast path does not take: every row through the reference path
        items = [record(i) for i in range(table.num_rows)]
        items = [it if isinstance(it, tuple) else (int(lines[i]), it, None) for i, it in enumerate(items)]
        return _records(items, validator, ctx)
    extra = set(cols) - set(SCHEMAS[ctx.schema]) - set(OPTIONAL_COLUMNS)
    out = {f: cols[f] for f in SCHEMAS[ctx.schema]}
    n = table.num_rows
    for f in OPTIONAL_COLUMNS:
        c = cols.get(f)
        if c is None or pa.types.is_null(c.type):
            out[f] = pa.nulls(n, pa.string())
        else:
            c = c.cast(pa.string())
            out[f] = pa.compute.if_else(pa.compute.equal(c, str_scalar("")), str_scalar(None), c)
    fast = pa.table(out, schema=arrow_schema(ctx.schema, ctx.tools))
    if ok.all():
        return fast, lines, [], extra
    bad = np.flatnonzero(~ok)
    items = []
    for i in bad:
        it = record(int(i))
        items.append(it if isinstance(it, tuple) else (int(lines[i]), it, None))
    slow, slow_lines, errors, _ = _records(items, validator, ctx)
    merged = pa.concat_tables([fast.filter(np_bools(ok)), slow])
    all_lines = np.concatenate([lines[ok], slow_lines])
    order = np.argsort(all_lines, kind="stable")
    return merged.take(np_ints(order)), all_lines[order], errors, extra


def _mapped(table: pa.Table, fmap: dict) -> dict | None:
    cols = {name: table.column(name) for name in table.column_names}
    for f, c in fmap.items():
        if c in cols:
            if f in cols and f not in fmap:
                return None  # per-row presence decides which value wins: the reference path knows
            cols[f] = cols.pop(c) if c not in fmap else cols[c]
    return cols


def _is_str(t) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _fast_ok(cols: dict, n: int, schema: str) -> np.ndarray | None:
    """bool (n,): rows the vectorised checks accept; None when a column's type rules the fast path out."""
    if schema == "chat":
        return None
    ok = np.ones(n, bool)
    for f in SCHEMAS[schema]:
        c = cols.get(f)
        if c is None or not _is_str(c.type):
            return None
        c = c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c
        if c.null_count:
            ok &= ~null_mask(c)
            c = c.fill_null(str_scalar(""))
        data, offs = str_buffers(c)
        ok &= ~rows_with(data == 0, offs)  # a NUL: the reference path refuses the row, naming it
        maybe = np.flatnonzero(edge_bytes(data, offs, WS_OR_HIGH))  # empty or blank-looking: ask Python
        if len(maybe):
            vals = c.take(np_ints(maybe)).to_pylist()
            ok[maybe[[not v.strip() for v in vals]]] = False
    for f in OPTIONAL_COLUMNS:
        c = cols.get(f)
        if c is not None and not (_is_str(c.type) or pa.types.is_int64(c.type) or pa.types.is_null(c.type)):
            return None
    return ok


# -- cleaning -----------------------------------------------------------------------------------
def _clean(table: pa.Table, lines: np.ndarray, ctx: Ctx) -> Cleaned:
    dets = piimod.detectors() if ctx.detector_keys is None else [piimod.DETECTORS[k] for k in ctx.detector_keys]
    if ctx.schema == "chat":
        return _clean_rows(table, lines, ctx, dets)
    fields = [f for f in TEXT_FIELDS if f in table.column_names]
    cols = {f: table.column(f).combine_chunks() for f in table.column_names}
    n = table.num_rows
    changed = np.zeros(n, bool)
    for f in fields + (["label"] if "label" in cols else []):
        cols[f], ch = normalize_array(cols[f], normalize_text)
        changed |= ch
    out = Cleaned(
        None,
        lines,
        np.zeros(0, np.uint64),
        np.zeros((0, 0), np.uint8),
        np.zeros((0, 0), np.uint64),
        normalized=int(changed.sum()),
    )
    failed = _pii_columns(cols, fields, lines, ctx.pii, dets, out, ctx.compiled)
    tbl = pa.table(cols, schema=table.schema)
    if failed is not None and failed.any():
        tbl, out.lines = tbl.filter(np_bools(~failed)), lines[~failed]
    req = SCHEMAS[ctx.schema]
    joined = (
        tbl.column(req[0])
        if len(req) == 1
        else pa.compute.binary_join_element_wise(*[tbl.column(f) for f in req], str_scalar("\x1e"))
    )
    out.keys = blake64(joined)
    texts = (
        tbl.column(fields[0])
        if len(fields) == 1
        else pa.compute.binary_join_element_wise(*[tbl.column(f) for f in fields], str_scalar("\n"))
    )
    out.sketch, out.bands = _minhasher(ctx).sketch_and_bands(texts)
    out.table = tbl
    return out


def _pii_columns(
    cols: dict, fields: list, lines, mode: str, dets, out: Cleaned, compiled: bool = False
) -> np.ndarray | None:
    """Scan candidate rows of each text column (in row, then field order, as the per-row path does):
    the vectorised gates pick the rows, ``pii.windows`` the places in them a match can be, and only
    those places go through the detectors' regular expressions."""
    n = len(lines)
    gates = {f: piimod.gates(cols[f], dets, compiled) for f in fields}  # per field: per detector, rows it may match
    cand = {f: np.logical_or.reduce(gates[f]) for f in fields}
    rows = np.flatnonzero(np.logical_or.reduce([cand[f] for f in fields])) if fields else []
    if not len(rows):
        return None
    finders = {f: _finder(cols[f], cand[f], gates[f], dets, compiled) for f in fields}
    failed = np.zeros(n, bool)
    new = {f: {} for f in fields}
    for r in rows.tolist():
        found = False
        for f in fields:
            if not cand[f][r]:
                continue
            text, spans = finders[f](r)
            if not spans:
                continue
            kinds = ", ".join(sorted({s.type for s in spans}))
            if mode == "fail":
                out.errors.append((int(lines[r]), RowError("pii", f"contains personal data ({kinds})", f)))
                failed[r] = True
                break
            found = True
            for s in spans:
                out.pii_counts[s.type] = out.pii_counts.get(s.type, 0) + 1
            if mode == "redact":
                new[f][r] = piimod.redact(text, spans)
            if len(out.pii_examples) < MAX_EXAMPLES:
                out.pii_examples.append((int(lines[r]), f, kinds))
        out.pii_rows += found
    for f in fields:
        if new[f]:
            mask = np.zeros(n, bool)
            idx = sorted(new[f])
            mask[idx] = True
            cols[f] = pa.compute.replace_with_mask(
                cols[f], np_bools(mask), pa_strings([new[f][i] for i in idx], cols[f].type)
            )
    return failed


def _finder(col: pa.Array, cand: np.ndarray, gates: list, dets, compiled: bool = False):
    """``finder(row) -> (text, spans)`` for the candidate rows of one column, equal to
    ``pii.scan(text, detectors whose gate passed)``: ASCII rows are searched only in their windows."""
    idx = np.flatnonzero(cand)
    sub = col.take(np_ints(idx))
    vals = sub.to_pylist()
    win = piimod.windows(sub, dets, [bool(g[idx].any()) for g in gates], compiled)
    pos = {r: k for k, r in enumerate(idx.tolist())}
    cuts = None
    if win is not None:
        ascii_, per_det = win
        cuts = [np.searchsorted(row, np.arange(len(idx) + 1)) for row, _, _ in per_det]
        per_det = [(a.tolist(), b.tolist()) for _, a, b in per_det]

    def finder(r: int):
        k = pos[r]
        text = vals[k]
        use = [g[r] for g in gates]
        if cuts is None or not ascii_[k]:
            return text, piimod.scan(text, [d for d, u in zip(dets, use) if u])
        found = []
        for d, u, c, (a, b) in zip(dets, use, cuts, per_det):
            lo, hi = int(c[k]), int(c[k + 1])
            if u and lo < hi:
                found.append(d.find_in(text, zip(a[lo:hi], b[lo:hi])))
        return text, piimod.merge(found)

    return finder


def _clean_rows(table: pa.Table, lines: np.ndarray, ctx: Ctx, dets) -> Cleaned:
    """Chat rows (nested messages): the per-row functions, then MinHash for the whole batch."""
    out = Cleaned(None, lines, np.zeros(0, np.uint64), np.zeros((0, 0), np.uint8), np.zeros((0, 0), np.uint64))
    rows, kept, texts, keys = [], [], [], []
    req = SCHEMAS[ctx.schema]
    for row, line in zip(table.to_pylist(), lines.tolist()):
        out.normalized += normalize_row(row, ctx.schema)
        err = _pii_row(row, ctx, dets, out, line)
        if err is not None:
            out.errors.append((line, err))
            continue
        keys.append(exact_key(row, ctx.schema, req))
        texts.append("\n".join(t for _, t in text_fields(row, ctx.schema)))
        rows.append(row)
        kept.append(line)
    out.table = pa.Table.from_pylist(rows, schema=table.schema)
    out.lines = np.asarray(kept, np.int64)
    out.keys = np.asarray(keys, np.uint64)
    out.sketch, out.bands = _minhasher(ctx).sketch_and_bands(texts)
    return out


def _pii_row(row: dict, ctx: Ctx, dets, out: Cleaned, line: int) -> RowError | None:
    found = False
    for label, text in text_fields(row, ctx.schema):
        spans = piimod.scan(text, dets)
        if not spans:
            continue
        kinds = ", ".join(sorted({s.type for s in spans}))
        if ctx.pii == "fail":
            return RowError("pii", f"contains personal data ({kinds})", label)
        found = True
        for s in spans:
            out.pii_counts[s.type] = out.pii_counts.get(s.type, 0) + 1
        if ctx.pii == "redact":
            i = int(label.split("[", 1)[1].split("]", 1)[0])
            row["messages"][i][label.rsplit(".", 1)[1]] = piimod.redact(text, spans)
        if len(out.pii_examples) < MAX_EXAMPLES:
            out.pii_examples.append((line, label, kinds))
    out.pii_rows += found
    return None
