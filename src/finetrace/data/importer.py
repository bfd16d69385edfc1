"""``import_dataset``: the one entry point of the data stage (``finetrace data import`` calls it).

Two streaming passes, so that a file of any size is never held in memory:

1. *Validate*: every row of every file is read, mapped, checked, normalised (NFC), scanned for PII and
   hashed (a 64-bit exact key, MinHash band keys to a scratch file), one Arrow record batch at a time
   (``batches.process``, in worker processes for large inputs); good rows go to a scratch Parquet.
   The file's layout (OpenAI, ShareGPT, Alpaca, native) is detected first (``formats``).
   Errors are collected; with ``on_error="fail"`` the import stops here with the first errors and the
   count, *before anything is written to the workspace* (a refused import changes nothing).
2. *Decide and write*: exact duplicates and near-duplicate clusters are resolved on the 8-byte arrays,
   splits are assigned (``split.assign``), the scratch Parquet is streamed into train/validation/test
   Parquet files, the datasheet is measured, and the folder is stored as a ``dataset`` artifact
   ``name@N`` by an ``import`` run whose inputs are the ``source`` artifacts (one per input file) and
   whose config holds the exact transform list.

This module holds the entry point, pass 1 and the decisions; the writing of pass 2 and the transform
list are in ``writer``.
"""

from __future__ import annotations

import shutil
import tempfile
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__ as FINETRACE_VERSION
from ..debris import scratch_prefix
from ..errors import InputError
from ..ledger import Artifact
from ..ledger.log import check_name
from ..workspace import Workspace
from . import formats, workers
from . import pii as piimod
from .batches import Ctx
from .clean import MinHasher, union_find_roots
from .datasheet import load_given
from .options import ImportOptions, build_options
from .readers import ReadOptions, RowError, detect_format, read_rows
from .split import DROP, SPLIT_NAMES, assign, check_fractions
from .validate import detect_schema
from .writer import transform_list, write_dataset

CHUNK_ROWS = 4096  # rows per Parquet row group written (pass 2)
MAX_REPORTED = 5  # errors shown when an import is refused
MAX_EXAMPLES = 20  # locations kept per skip reason / duplicate kind


@dataclass
class _Source:
    path: Path
    display: str
    fmt: str
    test: bool
    rows_read: int = 0
    rows_valid: int = 0
    digest: str = ""


@dataclass
class _Pass1:
    """What pass 1 keeps per valid row: 8-byte arrays only (no rows)."""

    keys: array = field(default_factory=lambda: array("Q"))
    source: array = field(default_factory=lambda: array("H"))
    line: array = field(default_factory=lambda: array("q"))
    label: array = field(default_factory=lambda: array("l"))
    group: array = field(default_factory=lambda: array("q"))
    labels: dict = field(default_factory=dict)
    groups: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    skipped_examples: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    n_errors: int = 0
    pii_counts: dict = field(default_factory=dict)
    pii_rows: int = 0
    pii_examples: list = field(default_factory=list)
    normalized: int = 0
    has_id: bool = False
    has_group: bool = False
    layout: object = None
    spills: list = field(default_factory=list)  # Arrow files of the kept rows, in row order


# duplicates: alike data/writer.py:write_dataset on purpose (a call of write_dataset and its signature).
def import_dataset(
    ws: Workspace,
    files: list[str | Path],
    name: str,
    options: ImportOptions | dict | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    **overrides,
) -> Artifact:
    """Import ``files`` as a new version of dataset ``name``; return the ``dataset`` artifact.

    ``options`` (an ``ImportOptions``; its fields say what each does) with ``overrides`` applied, e.g.
    ``import_dataset(ws, files, "tickets", on_error="skip", splits=(0.9, 0.1, 0))``. ``progress`` is
    called with the number of rows read so far. Raises InputError/ConfigError naming the file, line,
    field and what is wrong; a refused import writes nothing to the workspace.
    """
    opts = build_options(options, **overrides)
    check_name(name)
    given = load_given(opts.datasheet)
    detectors = piimod.detectors()
    sources = _sources(files, opts)
    ws.cache.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=scratch_prefix(ws.root, "import-"), dir=ws.cache))  # see debris.py
    minhasher = MinHasher(opts.near_dup_threshold, scratch)
    staging = _Staging(ws, sources)  # sources are copied into the store's temp folder during pass 1
    try:
        layout, fmap, fractions, p1, schema, dropped, decisions = _read_and_decide(
            sources, opts, detectors, scratch, minhasher, progress
        )

        transforms = _transforms(sources, fmap, schema, opts, detectors, fractions, layout)
        config = _config(name, opts, schema, fmap, fractions, transforms, layout)
        # only now, after every row was accepted, does anything enter the workspace
        src_digests = _store_sources(ws, sources, staging)
        with ws.ledger.run("import", config=config, inputs=src_digests, seed=opts.seed) as run:
            out = scratch / "dataset"
            info = write_dataset(
                out,
                p1,
                decisions,
                sources,
                schema,
                dropped,
                given,
                transforms,
                fractions,
                opts.seed,
                opts.pii,
                opts.near_dup_threshold,
                ws,
                opts.tokenizer,
                CHUNK_ROWS,
                opts.prompt_format,
            )
            run.metrics.update(
                {
                    "rows_in": info["rows_in"],
                    "rows_out": info["rows_out"],
                    "skipped": info["skipped"],
                    "dropped": info["dropped"],
                    "counts": info["counts"],
                    "pii": info["pii"]["counts"],
                    "exact_duplicates": info["duplicates"]["exact"],
                    "near_duplicates": info["duplicates"]["near"],
                }
            )
            digest = ws.store.put_dir(out)
            art = run.output(
                "dataset",
                digest,
                name=name,
                metadata={
                    "schema": schema,
                    "input_format": layout.fmt,
                    "counts": info["counts"],
                    "rows_in": info["rows_in"],
                    "rows_out": info["rows_out"],
                    "labels": info.get("labels"),
                    "gaps": info["gaps"],
                },
            )
        return art
    finally:
        staging.close()
        minhasher.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _transforms(sources, fmap, schema, opts: ImportOptions, detectors, fractions, layout) -> list[dict]:
    """The transform list recorded for this import, with the format mapping when the layout is not native."""
    transforms = transform_list(
        sources,
        fmap,
        schema,
        opts.on_error,
        opts.pii,
        detectors,
        opts.near_dup_threshold,
        opts.near_dup,
        opts.seed,
        fractions,
        opts.test_file is not None,
        opts.split_unit,
    )
    if layout.fmt != "native":  # the mapping from the file's layout onto the schema, recorded
        transforms.insert(
            1,
            {
                "op": "format",
                "format": layout.fmt,
                "detected": layout.detected,
                "mapping": formats.MAPPINGS[layout.fmt],
            },
        )
    return transforms


def _config(name: str, opts: ImportOptions, schema, fmap, fractions, transforms, layout) -> dict:
    """The ``import`` run's config: every option that shaped the dataset, and the exact transform list."""
    test_file = opts.test_file
    return {
        "name": name,
        "schema": schema,
        "mapping": fmap,
        "on_error": opts.on_error,
        "pii": opts.pii,
        "seed": opts.seed,
        "splits": list(fractions),
        "test_file": str(test_file) if test_file else None,
        "tokenizer": opts.tokenizer,
        "near_dup_threshold": opts.near_dup_threshold,
        "near_dup": opts.near_dup,
        "split_unit": opts.split_unit,
        **({"prompt_format": opts.prompt_format} if schema == "classification" else {}),
        "max_row_bytes": opts.max_row_bytes,
        "transforms": transforms,
        "finetrace_version": FINETRACE_VERSION,
        "input_format": layout.fmt,
        **({"from_hub": opts.from_hub} if opts.from_hub else {}),
    }


class _Staging:
    """Copies each input file into the store's temp folder in a thread while pass 1 reads it (hashing
    and writing release the GIL), so storing the sources after the import is accepted is a rename.
    Folders (a Hub snapshot) are stored at the end as before; ``close`` discards what was not placed."""

    def __init__(self, ws: Workspace, sources: list[_Source]):
        from concurrent.futures import ThreadPoolExecutor

        self.store = ws.store
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="finetrace-stage")
        self.futures = {id(s): self.pool.submit(self.store.stage_file, s.path) for s in sources if s.path.is_file()}

    def put(self, src: _Source) -> str:
        fut = self.futures.pop(id(src), None)
        if fut is None:
            return self.store.put_dir(src.path) if src.path.is_dir() else self.store.put_file(src.path)
        return self.store.place(*fut.result())

    def close(self) -> None:
        for fut in self.futures.values():
            if not fut.cancel():
                try:
                    self.store.discard(fut.result()[0])
                except Exception:  # the copy itself failed: nothing to discard
                    pass
        self.pool.shutdown(wait=True)


def _store_sources(ws: Workspace, sources, staging: _Staging) -> list[str]:
    """Store each input file (or folder) as a ``source`` artifact; return their digests, in order."""
    src_digests = []
    for s in sources:
        digest = staging.put(s)
        ws.ledger.add_artifact(
            "source", digest, metadata={"filename": s.path.name, "format": s.fmt, "bytes": ws.store.size(digest)}
        )
        s.digest = digest
        src_digests.append(digest)
    return src_digests


def _sources(files, opts: ImportOptions) -> list[_Source]:
    """The input files (the test file first), each with its detected file format."""
    if not files:
        raise InputError("no input files given", hint="finetrace data import FILE... --name NAME")
    sources = []
    if opts.test_file is not None:
        t = Path(opts.test_file)
        sources.append(_Source(t, str(opts.test_file), detect_format(t, str(opts.test_file)), True))
    for f in files:
        sources.append(_Source(Path(f), str(f), detect_format(Path(f), str(f)), False))
    return sources


def _read_and_decide(sources, opts: ImportOptions, detectors, scratch: Path, minhasher: MinHasher, progress):
    """Pass 1 over every file and the keep/split decisions (nothing enters a workspace)."""
    fractions = check_fractions(opts.splits)
    fmap = dict(opts.mapping or {})
    layout = _layout(next(s for s in sources if not s.test), opts, fmap)
    p1, schema, dropped, n = _validate_all(sources, opts, fmap, detectors, scratch, minhasher, progress, layout)
    p1.layout = layout
    _release_memory()
    decisions = _decide(p1, n, minhasher, sources, fractions, opts.seed, opts.near_dup, schema, opts.split_unit)
    _release_memory()
    return layout, fmap, fractions, p1, schema, dropped, decisions


def planned_counts(files: list[str | Path], options: ImportOptions | dict | None = None, **overrides) -> dict:
    """What an import of ``files`` would keep, without a workspace: rows read, and rows per split after
    validation, PII, exact and near-duplicate removal and splitting (``finetrace new`` sizes steps on
    ``counts["train"]``). Runs pass 1 and the decisions of ``import_dataset`` in a scratch folder."""
    opts = build_options(options, **overrides)
    scratch = Path(tempfile.mkdtemp(prefix="finetrace-plan-"))
    minhasher = MinHasher(opts.near_dup_threshold, scratch)
    try:
        sources = _sources(files, opts)
        _, _, _, _, _, _, d = _read_and_decide(sources, opts, piimod.detectors(), scratch, minhasher, None)
        return {
            "rows_in": sum(s.rows_read for s in sources),
            "dropped": d.dropped,
            "counts": {name: int((d.split == code).sum()) for code, name in SPLIT_NAMES.items()},
        }
    finally:
        minhasher.close()
        shutil.rmtree(scratch, ignore_errors=True)


# -- pass 1 -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    fmt: str  # openai | sharegpt | alpaca | native
    detected: bool  # found by content (not named by --format)
    schema: str | None  # the schema the format maps to (None: native, detect from the columns)
    tools: bool  # chat rows carry tool calls / tool role / weights


def _layout(src: _Source, opts: ImportOptions, fmap: dict) -> _Layout:
    """The input layout: named by ``input_format``, or detected from the first rows of the data file."""
    fmt, detected = opts.input_format, False
    if fmt == "auto":
        recs = []
        for _line, rec, err in read_rows(src.path, src.fmt, ReadOptions(opts.max_row_bytes, src.display)):
            if err is None:
                recs.append(rec)
            if len(recs) >= formats.DETECT_ROWS:
                break
        fmt, detected = formats.detect(recs), True
    if fmt == "native":
        return _Layout("native", detected, opts.schema, False)
    schema = formats.MAPPINGS[fmt]["schema"]
    if opts.schema not in (None, schema):
        raise InputError(
            f"the {fmt} format maps to the {schema} schema, not {opts.schema}",
            file=src.display,
            field="--schema",
            hint="drop --schema, or pass --format native",
        )
    if fmap:
        raise InputError(
            f"--map does not apply to the {fmt} format (its fields are fixed)",
            file=src.display,
            hint="drop --map, or pass --format native and map the columns yourself",
        )
    return _Layout(fmt, detected, schema, schema == "chat")


def _validate_all(sources, opts: ImportOptions, fmap, detectors, scratch, minhasher, progress, layout: _Layout):
    """Read, check and clean every row (in record batches, maybe in worker processes); keep only
    8-byte arrays per row; the good rows go to scratch Arrow files, one per chunk (``p1.spills``)."""
    p1 = _Pass1()
    schema = layout.schema
    dropped: set = set()
    n = total_read = 0
    spill = scratch / "rows"
    spill.mkdir()

    def bad(src: _Source, line: int, err: RowError):
        where = f"{src.display}:{line}"
        if opts.on_error == "skip":
            p1.skipped[err.reason] = p1.skipped.get(err.reason, 0) + 1
            ex = p1.skipped_examples.setdefault(err.reason, [])
            if len(ex) < MAX_EXAMPLES:
                ex.append(f"{where}" + (f" field '{err.field}'" if err.field else "") + f": {err.message}")
        else:
            p1.n_errors += 1
            if len(p1.errors) < MAX_REPORTED:
                p1.errors.append((src.display, line, err))

    with workers.Pool(opts.workers, sum(_size(s.path) for s in sources), detectors) as pool:
        for si, src in enumerate(sources):
            if schema is None:
                schema = _detect(src, fmap, opts)
            if schema is None:  # no row of this file parses: each is an error, reported as it is
                for line, _rec, err in read_rows(src.path, src.fmt, ReadOptions(opts.max_row_bytes, src.display)):
                    src.rows_read += 1
                    bad(src, line, err)
            else:
                ctx = Ctx(
                    schema,
                    fmap,
                    opts.pii,
                    opts.near_dup_threshold,
                    opts.max_row_bytes,
                    [k for k, d in piimod.DETECTORS.items() if d in detectors],
                    formats.mapper(layout.fmt),
                    layout.tools,
                    str(spill),
                    pool.compiled,
                )
                for res in pool.map(
                    workers.chunks(src.path, src.fmt, ReadOptions(opts.max_row_bytes, src.display)), ctx
                ):
                    src.rows_read += res.rows_read
                    total_read += res.rows_read
                    for line, err in res.errors:
                        bad(src, line, err)
                    _merge_pii(p1, res, src.display)
                    dropped |= res.extra
                    table = res.arrow()
                    if p1.n_errors or table is None or not table.num_rows:
                        continue  # refusing anyway: keep counting errors, skip the rest of the work
                    p1.spills.append(res.spilled)
                    minhasher.write(res.sketch, res.bands)
                    n = _keep(p1, res, table, si, schema, n)
                    src.rows_valid += table.num_rows
                    if progress:
                        progress(total_read)
            if src.rows_read == 0:
                raise InputError("the file holds no rows", file=src.display, hint="nothing to import from it")
    if p1.n_errors:
        file, line, err = p1.errors[0]
        more = p1.n_errors - 1
        others = "; ".join(
            f"{f}:{ln}" + (f" '{e.field}'" if e.field else "") + f" {e.message}" for f, ln, e in p1.errors[1:]
        )
        msg = err.message + (f" — and {more} more invalid row{'s' if more > 1 else ''}" if more else "")
        if others:
            msg += f" ({others}{', …' if more > len(p1.errors) - 1 else ''})"
        raise InputError(
            msg,
            file=file,
            line=line,
            field=err.field,
            hint="fix the file, or pass --on-error skip to import without invalid rows (each is counted by reason)",
        )
    if progress:
        progress(total_read)
    if n == 0:
        raise InputError(
            "no valid rows to import" + (f" (skipped: {p1.skipped})" if p1.skipped else ""), file=sources[0].display
        )
    return p1, schema, dropped, n


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _detect(src: _Source, fmap: dict, opts: ImportOptions) -> str | None:
    """The schema from the first row that parses (None when no row does)."""
    for line, rec, err in read_rows(src.path, src.fmt, ReadOptions(opts.max_row_bytes, src.display)):
        if err is None:
            try:
                return detect_schema(parse_keys(rec, fmap))
            except InputError as exc:
                raise InputError(exc.message, file=src.display, line=line, hint=exc.hint) from None
    return None


def _merge_pii(p1: _Pass1, res, display: str) -> None:
    p1.normalized += res.normalized
    p1.pii_rows += res.pii_rows
    for k, v in res.pii_counts.items():
        p1.pii_counts[k] = p1.pii_counts.get(k, 0) + v
    for line, label, kinds in res.pii_examples:
        if len(p1.pii_examples) < MAX_EXAMPLES:
            p1.pii_examples.append(f"{display}:{line} field '{label}': {kinds}")


def _keep(p1: _Pass1, res, table, si: int, schema: str, n: int) -> int:
    """Append the 8-byte per-row arrays of a batch of kept rows; return the new row count."""
    k = table.num_rows
    p1.keys.frombytes(np.ascontiguousarray(res.keys, np.uint64).tobytes())
    p1.source.frombytes(np.full(k, si, np.uint16).tobytes())
    p1.line.frombytes(np.ascontiguousarray(res.lines, np.int64).tobytes())
    if schema == "classification":
        labels = p1.labels
        p1.label.extend(labels.setdefault(v, len(labels)) for v in table.column("label").to_pylist())
    groups = table.column("group")
    if groups.null_count == k:
        p1.group.frombytes(np.full(k, -1, np.int64).tobytes())
    else:
        p1.has_group = True
        p1.group.extend(-1 if g is None else p1.groups.setdefault(g, n + j) for j, g in enumerate(groups.to_pylist()))
    p1.has_id |= table.column("id").null_count < k
    return n + k


def parse_keys(rec: dict, fmap: dict) -> list[str]:
    keys = set(rec)
    for f, c in fmap.items():
        if c in keys:
            keys.add(f)
            keys.discard(c)
    return sorted(str(k) for k in keys)


def _release_memory() -> None:
    """Hand freed heap memory back to the OS between phases (glibc keeps it otherwise), so phases'
    peaks do not stack up in the process's RSS. A no-op where glibc is not the allocator."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# -- decisions ----------------------------------------------------------------------------------
@dataclass
class _Decisions:
    split: np.ndarray  # per row: TRAIN/VALIDATION/TEST or DROP
    dropped: dict  # reason -> count
    dup_examples: list
    near_pairs: int
    near_clusters: int
    near_examples: list


def _decide(
    p1: _Pass1, n: int, minhasher: MinHasher, sources, fractions, seed, near_dup, schema, split_unit: str = "row"
) -> _Decisions:
    keys = np.frombuffer(p1.keys, np.uint64) if n else np.zeros(0, np.uint64)
    src = np.frombuffer(p1.source, np.uint16)
    lines = np.frombuffer(p1.line, np.int64)
    is_test = np.array([sources[s].test for s in range(len(sources))], bool)[src]

    def loc(i: int) -> str:
        return f"{sources[int(src[i])].display}:{int(lines[i])}"

    # first occurrence of each exact key: a stable sort keeps equal keys in row order
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    del sk
    first_of = np.empty(n, np.int64)
    first_of[order] = order[np.repeat(starts, np.diff(np.r_[starts, n]))]
    del order, starts
    _release_memory()
    dup = first_of != np.arange(n)
    reason = np.zeros(n, np.int8)  # 0 keep, 1 exact dup, 2 exact dup of test, 3 near dup, 4 overlaps test
    reason[dup] = 1
    reason[dup & is_test[first_of] & ~is_test] = 2
    dup_examples = [f"{loc(i)} repeats {loc(int(first_of[i]))}" for i in np.flatnonzero(dup)[:MAX_EXAMPLES]]

    active = ~dup
    pairs = minhasher.pairs(active)
    _release_memory()
    base = np.arange(n, dtype=np.int64)
    if split_unit == "group":
        grp = np.frombuffer(p1.group, np.int64)
        base[grp >= 0] = grp[grp >= 0]
    roots = union_find_roots(n, base, [(a, b) for a, b, _ in pairs])
    near_rows = np.zeros(n, bool)
    for a, b, _ in pairs:
        near_rows[a] = near_rows[b] = True
    near_roots = np.unique(roots[near_rows])
    near_examples = [f"{loc(a)} ~ {loc(b)} (Jaccard ≈ {j:.2f})" for a, b, j in pairs[:MAX_EXAMPLES]]
    if near_dup == "drop":
        # keep one row per near-duplicate cluster: its root (the first row of the cluster)
        member = near_rows & active & (roots != np.arange(n))
        reason[member & (reason == 0)] = 3
    if is_test.any():
        test_unit = np.zeros(n, bool)
        test_unit[roots[is_test & active]] = True
        reason[active & ~is_test & test_unit[roots] & (reason == 0)] = 4
    strata = np.frombuffer(p1.label, np.int64) if schema == "classification" else np.zeros(n, np.int64)
    split = assign(roots, keys, strata, fractions, seed, forced_test=is_test)
    split[reason != 0] = DROP
    names = {1: "exact_duplicate", 2: "duplicate_of_test", 3: "near_duplicate", 4: "overlaps_test"}
    dropped = {names[k]: int((reason == k).sum()) for k in names if (reason == k).any()}
    return _Decisions(split, dropped, dup_examples, len(pairs), len(near_roots), near_examples)
