"""Readers: one per input format, registered in ``READERS``, each streaming rows out of one file.

A reader yields ``(position, record, error)`` tuples, one per row: ``position`` is the 1-based line
(text formats) or row (Parquet, Arrow) where the row starts, ``record`` a dict (or None) and ``error`` a
``RowError`` (or None). Rows are never all in memory: text is read line by line (a line longer than
``max_row_bytes`` is reported, not loaded), Parquet and Arrow batch by batch.

Compression is recognised by content (gzip ``1f 8b``, zstd ``28 b5 2f fd``), Parquet by its ``PAR1``
magic, a ``datasets`` ``save_to_disk`` folder by its ``state.json``/``dataset_dict.json``; the rest by
file extension, then by the first byte. Text must be UTF-8 (a UTF-8 byte order mark is skipped); any
other encoding is an error naming the file, line and byte offset.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .compressed import compression_of, open_binary

MAX_ROW_BYTES = 16 << 20  # a row (line) longer than this is refused, never loaded whole
BATCH_ROWS = 2048
UTF8_BOM = codecs.BOM_UTF8


@dataclass(frozen=True)
class RowError:
    """Why one row is not usable: ``reason`` is a short code used for counts (``invalid_json``…)."""

    reason: str
    message: str
    field: str | None = None


Row = tuple[int, "dict | None", "RowError | None"]
Reader = Callable[[Path, "ReadOptions"], Iterator[Row]]


@dataclass(frozen=True)
class ReadOptions:
    max_row_bytes: int = MAX_ROW_BYTES
    display: str = ""  # the name used in messages (the path the user typed)


# -- opening ------------------------------------------------------------------------------------
# duplicates: alike within on purpose (the UTF-32 and UTF-16 byte order mark refusals).
def _check_start(fh, display: str) -> int:
    """Skip a UTF-8 BOM (return its length); refuse UTF-16/32 byte order marks, naming the encoding."""
    head = fh.peek(4)[:4]
    if head.startswith(UTF8_BOM):
        fh.read(3)
        return 3
    if head[:4] in (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE):
        raise InputError(
            "the file is UTF-32 encoded (it starts with a UTF-32 byte order mark)",
            file=display,
            line=1,
            hint="re-save it as UTF-8",
        )
    elif head[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        raise InputError(
            "the file is UTF-16 encoded (it starts with a UTF-16 byte order mark)",
            file=display,
            line=1,
            hint="re-save it as UTF-8",
        )
    return 0


def _decode_error(exc: UnicodeDecodeError, line_offset: int, chunk: bytes) -> RowError:
    bad = chunk[exc.start]
    return RowError(
        "encoding",
        f"byte offset {line_offset + exc.start} (0x{bad:02x}) is not valid UTF-8; "
        "the file looks Latin-1/Windows-1252 encoded: re-save it as UTF-8",
    )


def _skip_rest_of_line(fh, n: int) -> int:
    """Consume the rest of an over-long line without keeping it; return its whole length (``n`` read so far)."""
    while True:
        c = fh.readline(1 << 20)
        n += len(c)
        if not c or c.endswith(b"\n"):
            return n


def _lines(fh, max_bytes: int) -> Iterator[tuple[int, int, bytes | None, int]]:
    """(line number, byte offset, line bytes or None when longer than ``max_bytes``, length)."""
    lineno = offset = 0
    while True:
        b = fh.readline(max_bytes + 1)
        if not b:
            return
        lineno += 1
        if len(b) > max_bytes and not b.endswith(b"\n"):
            n = _skip_rest_of_line(fh, len(b))
            yield lineno, offset, None, n
            offset += n
            continue
        yield lineno, offset, b, len(b)
        offset += len(b)


def _too_long(n: int, limit: int) -> RowError:
    return RowError(
        "row_too_long",
        f"the line is {n / 1e6:.1f} MB, longer than the limit of "
        f"{limit / 1e6:.1f} MB per row; split it or raise max_row_bytes",
    )


# -- readers ------------------------------------------------------------------------------------
def read_jsonl(path: Path, opts: ReadOptions) -> Iterator[Row]:
    with open_binary(path, opts.display) as fh:
        bom = _check_start(fh, opts.display)
        yield from jsonl_rows(fh, opts, 1, bom)


def _no_duplicates(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise DuplicateKey(dup)
    return obj


class DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def duplicate_key_error(exc: DuplicateKey) -> RowError:
    return RowError(
        "duplicate_key",
        f"the key {exc.key!r} appears twice in one object (JSON keeps only the last one, silently); keep one of them",
        str(exc.key),
    )


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates)


def jsonl_rows(fh, opts: ReadOptions, first_line: int = 1, base_offset: int = 0) -> Iterator[Row]:
    """Rows of JSONL text from ``fh`` (after any BOM); lines and byte offsets count from the given ones."""
    for lineno, offset, b, n in _lines(fh, opts.max_row_bytes):
        lineno += first_line - 1
        if b is None:
            yield lineno, None, _too_long(n, opts.max_row_bytes)
            continue
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield lineno, None, _decode_error(exc, offset + base_offset, b)
            continue
        if not text.strip():
            continue
        text = text.rstrip("\r\n")
        try:
            value = _DECODER.decode(text)
        except json.JSONDecodeError as exc:
            what = _json_problem(exc, text)
            yield lineno, None, RowError("invalid_json", f"{what}: {exc.msg.removesuffix(' at')} at column {exc.colno}")
            continue
        except DuplicateKey as exc:
            yield lineno, None, duplicate_key_error(exc)
            continue
        except RecursionError:
            yield lineno, None, RowError("invalid_json", "the JSON is nested too deeply; flatten it")
            continue
        if not isinstance(value, dict):
            yield lineno, None, RowError("not_an_object", f"expected a JSON object, got {_jtype(value)}")
            continue
        yield lineno, value, None


def jsonl_chunks(
    path: Path, opts: ReadOptions, size: int = 4 << 20
) -> Iterator[tuple[int, int, bytes | None, Row | None]]:
    """``(first line, byte offset, block of whole lines, None)`` of a JSONL file (decompressed); a line
    longer than ``opts.max_row_bytes`` that would straddle two blocks comes as ``(line, offset, None,
    row error)`` and is never held whole."""
    with open_binary(path, opts.display) as fh:
        line, offset = 1, _check_start(fh, opts.display)
        limit = opts.max_row_bytes
        while True:
            block = fh.read(size)
            if not block:
                return
            long_line = None
            if not block.endswith(b"\n"):
                cut = block.rfind(b"\n") + 1
                part = block[cut:]
                part += fh.readline(limit + 1 - len(part)) if len(part) <= limit else b""
                if len(part) > limit and not part.endswith(b"\n"):
                    n = _skip_rest_of_line(fh, len(part))
                    block = block[:cut]
                    long_line = (n, _too_long(n, limit))
                else:
                    block = block[:cut] + part
            if block:
                yield line, offset, block, None
                line += block.count(b"\n")
                offset += len(block)
            if long_line is not None:
                yield line, offset, None, (line, None, long_line[1])
                line += 1
                offset += long_line[0]


def _json_problem(exc: json.JSONDecodeError, text: str) -> str:
    """'truncated JSON' when the text ends inside a value, else 'invalid JSON'."""
    cut = exc.msg.startswith("Unterminated") or exc.pos >= len(text.rstrip())
    return "truncated JSON" if cut else "invalid JSON"


def _jtype(v) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
        int: "a number",
        float: "a number",
    }.get(type(v), type(v).__name__)


def read_json_array(path: Path, opts: ReadOptions) -> Iterator[Row]:
    """A top-level JSON array of objects, parsed element by element (never the whole array at once)."""
    dec = _DECODER
    chunk = 1 << 20
    with open_binary(path, opts.display) as fh:
        _check_start(fh, opts.display)
        udec = codecs.getincrementaldecoder("utf-8")("strict")
        consumed = 0
        buf, pos, line, eof = "", 0, 1, False

        def more() -> bool:
            nonlocal buf, eof, consumed
            if eof:
                return False
            raw = fh.read(chunk)
            try:
                buf += udec.decode(raw, final=not raw)
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"byte offset {consumed + exc.start} is not valid UTF-8; the file looks "
                    "Latin-1/Windows-1252 encoded",
                    file=opts.display,
                    line=line + buf[pos:].count("\n"),
                    hint="re-save it as UTF-8",
                ) from None
            consumed += len(raw)
            eof = not raw
            return True

        def skip_ws() -> str | None:
            nonlocal pos, line
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    if buf[pos] == "\n":
                        line += 1
                    pos += 1
                if pos < len(buf):
                    return buf[pos]
                if not more():
                    return None

        first = skip_ws()
        if first != "[":
            raise InputError(
                "expected a JSON array ('[' …)" + (" but the file is empty" if first is None else f", found {first!r}"),
                file=opts.display,
                line=line,
            )
        pos += 1
        expect_value, after_comma = True, False
        while True:
            c = skip_ws()
            if c is None:
                yield line, None, RowError("invalid_json", "truncated JSON: the array is not closed with ']'")
                return
            if c == "]":  # closes the array, unless a comma promised one more element
                if after_comma:
                    yield (
                        line,
                        None,
                        RowError(
                            "invalid_json",
                            "invalid JSON: a trailing comma before ']'; remove the comma after the last element",
                        ),
                    )
                return
            if c == "," and not expect_value:
                pos += 1
                expect_value, after_comma = True, True
                continue
            if not expect_value:
                yield line, None, RowError("invalid_json", f"invalid JSON: expected ',' or ']', found {c!r}")
                return
            start_line = line
            while True:
                try:
                    try:
                        value, end = dec.raw_decode(buf, pos)
                        dup = None
                    except DuplicateKey as exc:  # find the element's end, then refuse it
                        dup = exc
                        value, end = json.JSONDecoder().raw_decode(buf, pos)
                    if end >= len(buf) and not eof:
                        raise json.JSONDecodeError("incomplete", buf, end)
                    break
                except RecursionError:
                    yield start_line, None, RowError("invalid_json", "the JSON is nested too deeply; flatten it")
                    return
                except json.JSONDecodeError as exc:
                    if len(buf) - pos > opts.max_row_bytes:
                        yield start_line, None, _too_long(len(buf) - pos, opts.max_row_bytes)
                        return
                    if more():
                        continue
                    yield (
                        start_line,
                        None,
                        RowError(
                            "invalid_json",
                            f"{_json_problem(exc, buf)}: {exc.msg} (element starting at line {start_line})",
                        ),
                    )
                    return
            line += buf.count("\n", pos, end)
            pos = end
            if pos > chunk:
                buf, pos = buf[pos:], 0
            expect_value, after_comma = False, False
            if dup is not None:
                yield start_line, None, duplicate_key_error(dup)
            elif not isinstance(value, dict):
                yield start_line, None, RowError("not_an_object", f"expected a JSON object, got {_jtype(value)}")
            else:
                yield start_line, value, None


class _DecodedLines:
    """Iterator of decoded text lines for ``csv.reader``; decode errors are kept for the caller."""

    def __init__(self, fh, opts: ReadOptions):
        self.it = _lines(fh, opts.max_row_bytes)
        self.opts = opts
        self.lineno = 0
        self.errors: list[tuple[int, RowError]] = []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        while True:
            lineno, offset, b, n = next(self.it)
            self.lineno = lineno
            if b is None:
                self.errors.append((lineno, _too_long(n, self.opts.max_row_bytes)))
                continue
            try:
                return b.decode("utf-8")
            except UnicodeDecodeError as exc:
                self.errors.append((lineno, _decode_error(exc, offset, b)))


def _read_delimited(path: Path, opts: ReadOptions, delimiter: str) -> Iterator[Row]:
    csv.field_size_limit(max(opts.max_row_bytes, 1 << 20))
    with open_binary(path, opts.display) as fh:
        _check_start(fh, opts.display)
        lines = _DecodedLines(fh, opts)
        reader = csv.reader(lines, delimiter=delimiter)
        header: list[str] | None = None
        while True:
            start = lines.lineno + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                yield start, None, RowError("invalid_csv", f"malformed CSV: {exc}")
                continue
            for ln, err in lines.errors:
                yield ln, None, err
            lines.errors.clear()
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if header is None:
                header = [h.strip() for h in row]
                dupes = sorted({h for h in header if header.count(h) > 1})
                if dupes or any(not h for h in header):
                    raise InputError(
                        f"the header row has {'duplicate' if dupes else 'empty'} column names "
                        f"({', '.join(dupes) or 'an empty name'})",
                        file=opts.display,
                        line=start,
                        hint="give every column a unique name",
                    )
                continue
            if len(row) != len(header):
                yield (
                    start,
                    None,
                    RowError(
                        "ragged_row",
                        f"the row has {len(row)} fields but the header has {len(header)} ({', '.join(header)})",
                    ),
                )
                continue
            yield start, dict(zip(header, row)), None
        for ln, err in lines.errors:
            yield ln, None, err


def read_csv(path: Path, opts: ReadOptions) -> Iterator[Row]:
    return _read_delimited(path, opts, ",")


def read_tsv(path: Path, opts: ReadOptions) -> Iterator[Row]:
    return _read_delimited(path, opts, "\t")


@contextlib.contextmanager
def _plain_file(path: Path) -> Iterator[Path]:
    """A binary format that was compressed as a whole: decompress it to a temporary file."""
    if compression_of(path) is None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="finetrace-") as tmp:
        out = Path(tmp) / "plain"
        with open_binary(path) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        yield out


def parquet_tables(path: Path, opts: ReadOptions, batch_rows: int = BATCH_ROWS):
    """Arrow tables of ``batch_rows`` rows each, streamed from a Parquet file (compressed as a whole too)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _plain_file(path) as plain:
        try:
            pf = pq.ParquetFile(plain, pre_buffer=False, buffer_size=1 << 20)
        except Exception as exc:  # pyarrow raises ArrowInvalid for a damaged footer
            raise InputError(
                f"not a readable Parquet file: {exc}", file=opts.display, hint="re-export it, or convert it to JSONL"
            ) from None
        try:
            for batch in pf.iter_batches(batch_size=batch_rows):
                yield pa.Table.from_batches([batch])
        except (OSError, pa.ArrowException) as exc:  # a damaged page or column chunk
            raise InputError(
                f"the Parquet file is damaged: {exc}", file=opts.display, hint="re-export it, or convert it to JSONL"
            ) from None


def read_parquet(path: Path, opts: ReadOptions) -> Iterator[Row]:
    n = 0
    for table in parquet_tables(path, opts):
        for rec in table.to_pylist():
            n += 1
            yield n, rec, None


def _arrow_files(folder: Path) -> list[Path]:
    state = json.loads((folder / "state.json").read_text())
    return [folder / f["filename"] for f in state.get("_data_files", [])]


def read_hf_disk(path: Path, opts: ReadOptions) -> Iterator[Row]:
    """A ``datasets`` ``save_to_disk`` folder (one Dataset, or a DatasetDict: every split, in order)."""
    import pyarrow as pa

    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        folders = [path / s for s in splits]
    else:
        folders = [path]
    n = 0
    for folder in folders:
        if not (folder / "state.json").is_file():
            raise InputError("not a `datasets` save_to_disk folder (no state.json)", file=str(folder))
        for f in _arrow_files(folder):
            with pa.memory_map(str(f)) as src:
                try:  # save_to_disk writes the Arrow stream format; accept the file format too
                    batches = iter(pa.ipc.open_stream(src))
                except pa.ArrowInvalid:
                    src.seek(0)
                    reader = pa.ipc.open_file(src)
                    batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
                for batch in batches:
                    for rec in batch.to_pylist():
                        n += 1
                        yield n, rec, None


READERS: dict[str, Reader] = {
    "jsonl": read_jsonl,
    "json": read_json_array,
    "csv": read_csv,
    "tsv": read_tsv,
    "parquet": read_parquet,
    "hf_disk": read_hf_disk,
}
EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
COMPRESSED_SUFFIXES = (".gz", ".gzip", ".zst", ".zstd")


def register_reader(fmt: str, reader: Reader, extensions: tuple[str, ...] = ()) -> None:
    """Add a format (a plug-in does this exactly like the built-ins above)."""
    READERS[fmt] = reader
    for ext in extensions:
        EXTENSIONS[ext] = fmt


def detect_format(path: Path, display: str | None = None) -> str:
    """The format of ``path``: by content where it can tell (folders, Parquet), else by name, else sniffed."""
    display = display or str(path)
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "hf_disk"
        raise InputError(
            "a folder that is not a `datasets` save_to_disk folder",
            file=display,
            hint="give the data files themselves, or a folder written by Dataset.save_to_disk",
        )
    if not path.is_file():
        raise InputError("no such file", file=display)
    if path.stat().st_size == 0:
        raise InputError("the file is empty (0 bytes)", file=display, hint="nothing to import")
    with open_binary(path, display) as fh:
        head = fh.peek(4096)[:4096]
    if head.startswith(b"PAR1"):
        return "parquet"
    name = path.name.lower()
    for suf in COMPRESSED_SUFFIXES:
        if name.endswith(suf):
            name = name[: -len(suf)]
    ext = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    first = head.lstrip(UTF8_BOM).lstrip()[:1]
    if ext == ".json" and first == b"{":
        return "jsonl"  # a .json file holding one object per line
    if ext in EXTENSIONS:
        return EXTENSIONS[ext]
    if first == b"[":
        return "json"
    if first == b"{":
        return "jsonl"
    raise InputError(
        "cannot tell the file's format",
        file=display,
        hint="name it .jsonl, .json, .csv, .tsv or .parquet (optionally .gz/.zst)",
    )


def read_rows(path: Path, fmt: str, opts: ReadOptions) -> Iterator[Row]:
    if fmt not in READERS:
        raise InputError(f"unknown format {fmt!r}", hint=f"one of {', '.join(READERS)}")
    return READERS[fmt](path, opts)
