"""Chunks of an input file, and the worker processes that clean them in order.

``chunks(path, fmt, opts)`` cuts a file into ``batches.Chunk`` work items without holding more than a
block: JSONL as ~4 MiB blocks of whole lines (with their first line number and byte offset; a plain
file's blocks go by offset and length, and the process that cleans one reads it), Parquet as Arrow
tables, every other format as groups of rows from its reader. ``Pool(...).map(chunks, ctx)``
yields ``batches.Cleaned`` results in input order, at most ``2 × workers`` chunks in flight, so memory
stays flat in the file size; with no workers it runs each chunk in this process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from .batches import Chunk, Cleaned, Ctx, process
from .compressed import compression_of, open_binary
from .readers import ReadOptions, Row, _check_start, _too_long, jsonl_chunks, parquet_tables, read_rows

AUTO_MIN_BYTES = 64 << 20  # smaller inputs: start-up of workers costs more than they save
AUTO_MAX_WORKERS = 4
# bytes of input above which the compiled kernels pay for numba's import and loading their cached code
# (~0.7 s of CPU, once: the workers are forked after it); below it the numpy loops are faster overall
COMPILED_MIN_BYTES = 96 << 20
RECORDS_PER_CHUNK = 4096
JSONL_CHUNK_BYTES = 4 << 20
TABLE_ROWS = 8192


def chunks(path: Path, fmt: str, opts: ReadOptions) -> Iterator[Chunk]:
    if fmt == "jsonl":
        plain = path.is_file() and compression_of(path) is None
        spans = _jsonl_spans(path, opts, JSONL_CHUNK_BYTES) if plain else jsonl_chunks(path, opts, JSONL_CHUNK_BYTES)
        for line, offset, block, row in spans:
            if row is not None:
                yield Chunk("records", line, offset, [row])
            elif isinstance(block, int):  # a span of the plain file: its bytes are read where it is cleaned
                yield Chunk("jsonl", line, offset, None, source=str(path), size=block)
            else:
                yield Chunk("jsonl", line, offset, block, size=len(block))
    elif fmt == "parquet":
        row = 1
        for table in parquet_tables(path, opts, TABLE_ROWS):  # noqa: B007
            yield Chunk("table", row, 0, table)
            row += table.num_rows
    else:
        items: list = []
        for item in read_rows(path, fmt, opts):
            items.append(item)
            if len(items) >= RECORDS_PER_CHUNK:
                yield Chunk("records", items[0][0], 0, items)
                items = []
        if items:
            yield Chunk("records", items[0][0], 0, items)


def _jsonl_spans(path: Path, opts: ReadOptions, size: int) -> Iterator[tuple[int, int, int, Row | None]]:
    """``readers.jsonl_chunks`` of a plain file, giving each block's length instead of its bytes: the
    same ``(first line, byte offset, length, None)`` blocks (and an over-long line as ``(line, offset,
    0, row error)``). A block is read only to find its last newline and count its lines (in numpy);
    the process that cleans it reads it again, from the page cache."""
    import numpy as np

    with open_binary(path, opts.display) as fh:
        pos = _check_start(fh, opts.display)
    limit = opts.max_row_bytes
    line = 1
    with open(path, "rb") as fh:
        fd = fh.fileno()

        def newline_after(start: int, most: int | None) -> tuple[int, bool]:
            """(bytes up to and including the next newline from ``start``, at most ``most``; found)."""
            got = 0
            while most is None or got < most:
                want = 1 << 16 if most is None else min(1 << 16, most - got)
                piece = os.pread(fd, want, start + got)
                if not piece:
                    return got, False
                nl = piece.find(b"\n")
                if nl >= 0:
                    return got + nl + 1, True
                got += len(piece)
            return got, False

        while True:
            block = os.pread(fd, size, pos)
            if not block:
                return
            length, lines, long_line = len(block), 0, None
            if not block.endswith(b"\n"):  # the block ends inside a line: as jsonl_chunks, to its end
                cut = block.rfind(b"\n") + 1
                part = length - cut
                ends_nl = False
                if part <= limit:  # readline(limit + 1 - part)
                    extra, ends_nl = newline_after(pos + length, limit + 1 - part)
                    part += extra
                if part > limit and not ends_nl:  # the whole line, as _skip_rest_of_line counts it
                    n = part + newline_after(pos + cut + part, None)[0]
                    long_line = (n, _too_long(n, limit))
                    length = cut
                else:
                    length, lines = cut + part, int(ends_nl)
            if length:
                yield line, pos, length, None
                lines += int(np.count_nonzero(np.frombuffer(block, np.uint8, min(length, len(block))) == 10))
                line += lines
                pos += length
            if long_line is not None:
                yield line, pos, 0, (line, None, long_line[1])
                line += 1
                pos += long_line[0]


def _ipc(chunk: Chunk) -> Chunk:
    if chunk.kind == "table" and not isinstance(chunk.payload, bytes):
        import pyarrow as pa

        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, chunk.payload.schema) as w:
            w.write_table(chunk.payload)
        chunk.payload = sink.getvalue().to_pybytes()
    return chunk


class Pool:
    """Worker processes for ``process`` (``workers`` 0: automatic, from the input size and CPUs).

    One fresh interpreter (``_serve_all``: nothing of the caller's state, threads or model is
    inherited, and a caller's script is never re-imported) imports pyarrow, numpy and the compiled
    kernels once, then forks itself into the workers, so they start with all of it loaded. Each worker
    is fed chunks on its own pipe (pickle frames, rebuilt by an allow-list: ``_Frames``) and answers on
    another. Chunks go round-robin, so results come back in input order. Workers are used only when
    every PII detector in use is a built-in one: a detector registered at run time lives in this
    process alone.
    """

    def __init__(self, workers: int, input_bytes: int, detectors: list):
        from . import pii

        if workers == 0:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            workers = min(AUTO_MAX_WORKERS, cpus) if input_bytes >= AUTO_MIN_BYTES and cpus > 1 else 1
        builtin = {id(d) for d in pii.BUILTIN}
        self.workers = workers if all(id(d) in builtin for d in detectors) else 1
        # the kernels are loaded once, in the process the workers are forked from
        self.compiled = input_bytes >= COMPILED_MIN_BYTES and _numba_installed()
        self.procs: list = []  # per worker: (pipe it reads chunks from, pipe it answers on), our ends
        self.helper = None
        self.seq = 0  # chunks handed out so far, over every file of the import

    def __enter__(self) -> Pool:
        if self.workers > 1:
            import subprocess
            import sys

            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [_src_root(), os.environ.get("PYTHONPATH")])),
            }
            theirs, ours = [], []
            for _ in range(self.workers):
                r_in, w_in = os.pipe()
                r_out, w_out = os.pipe()
                theirs.append((r_in, w_out))
                ours.append((w_in, r_out))
            try:
                self.helper = subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        "from finetrace.data.workers import _serve_all; _serve_all()",
                        ",".join(f"{a}:{b}" for a, b in theirs),
                        "1" if self.compiled else "0",
                    ],
                    stdin=subprocess.DEVNULL,
                    pass_fds=[fd for pair in theirs for fd in pair],
                    env=env,
                )
            finally:
                for pair in theirs:
                    for fd in pair:
                        os.close(fd)
            self.procs = [(os.fdopen(w, "wb"), os.fdopen(r, "rb", buffering=0)) for w, r in ours]
        return self

    def __exit__(self, *exc) -> None:
        for w, r in self.procs:
            for fh in (w, r):  # a worker still writing gets EPIPE and exits; one reading gets EOF
                try:
                    fh.close()
                except OSError:
                    pass
        if self.helper is not None:
            try:
                self.helper.wait(timeout=30)
            except Exception:
                self.helper.kill()
                self.helper.wait()

    def map(self, items: Iterator[Chunk], ctx: Ctx) -> Iterator[Cleaned]:
        if not self.procs:
            for chunk in items:
                chunk.seq, self.seq = self.seq, self.seq + 1
                yield process(chunk, ctx)
            return
        w = len(self.procs)
        sent = 0
        received = 0
        for chunk in items:
            chunk.seq, self.seq = self.seq, self.seq + 1
            if sent - received >= 2 * w:  # the oldest chunk in flight belongs to this worker
                yield self._receive(received % w)
                received += 1
            _send(self.procs[sent % w][0], (_ipc(chunk.by_reference()), ctx))
            sent += 1
        while received < sent:
            yield self._receive(received % w)
            received += 1

    def _receive(self, i: int) -> Cleaned:
        ok, value = _recv(self.procs[i][1])
        if not ok:
            from ..errors import FinetraceError

            raise FinetraceError(
                f"a data worker process failed: {value}",
                hint="run the import again with --workers 1 to see the error in this process",
            )
        return value


def _numba_installed() -> bool:
    """Whether numba can be imported (looked up, not imported: only the processes that use it pay)."""
    from importlib.util import find_spec

    return find_spec("numba") is not None


def _src_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def _send(fh, obj) -> None:
    import pickle

    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    fh.write(len(data).to_bytes(8, "little") + data)
    fh.flush()


class _Frames:
    """Reads one frame sent by ``_send``. The frames only ever cross the pipes between this process and
    the workers it started, and even so only the classes a frame can hold are rebuilt: finetrace's
    data classes, numpy arrays and a few builtins (anything else is refused, never imported)."""

    ALLOWED_MODULES = ("finetrace.data.", "numpy")
    ALLOWED_BUILTINS = {"set", "frozenset", "slice", "complex", "range"}

    @classmethod
    def load(cls, data: bytes):
        import io
        import pickle

        class Restricted(pickle.Unpickler):
            def find_class(self, module: str, name: str):
                if (
                    (module == "builtins" and name in cls.ALLOWED_BUILTINS)
                    or module == "collections"
                    or module.startswith(cls.ALLOWED_MODULES)
                ):
                    return super().find_class(module, name)
                raise pickle.UnpicklingError(f"a data worker frame may not hold {module}.{name}")

        return Restricted(io.BytesIO(data)).load()


def _read_exact(fh, n: int) -> bytes | None:
    """``n`` bytes from an unbuffered pipe (None at its end)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = fh.readinto(view[got:])
        if not k:
            return None
        got += k
    return bytes(buf)


def _recv(fh):
    head = _read_exact(fh, 8)
    if head is None:
        return False, "it exited"
    data = _read_exact(fh, int.from_bytes(head, "little"))
    if data is None:
        return False, "it exited"
    return _Frames.load(data)


def _no_pandas_in_pyarrow() -> None:
    """Tell pyarrow that pandas is absent in this worker (it never converts to pandas): pyarrow
    otherwise imports pandas, ~2 s and ~50 MiB, on the first Python scalar or list it converts, to ask
    whether it is a pandas object. pyarrow asks once and remembers; an API that needs pandas would
    still import it then. Only for worker processes: a caller's own process is left as it is."""
    import importlib.abc
    import sys

    if "pandas" in sys.modules:
        return  # already loaded: nothing to save

    class _Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "pandas" or name.startswith("pandas."):
                raise ImportError("pandas is not used by data workers")
            # any other module: None, the next finder's turn

    finder = _Refuse()
    sys.meta_path.insert(0, finder)
    try:
        import pyarrow as pa

        pa.scalar(0)  # the first conversion: pyarrow tries pandas here, and remembers that it failed
    finally:
        sys.meta_path.remove(finder)


def _serve_all() -> None:
    """The workers' process: load what cleaning needs once, then fork into one worker per pipe pair
    (``argv[1]``: ``IN:OUT,...`` file descriptors; ``argv[2]``: 1 to load the compiled kernels), each
    serving its pipes (``_serve``). This process serves the first pair and waits for the others, so
    their resource use is counted with its own."""
    import sys

    pairs = [tuple(int(fd) for fd in p.split(":")) for p in sys.argv[1].split(",")]
    _no_pandas_in_pyarrow()
    import pyarrow.json  # noqa: F401  (parsing JSONL: loaded once, before forking)

    if sys.argv[2] == "1":
        from . import compiled

        compiled.warm()
    kids = []
    for i in range(1, len(pairs)):
        pid = os.fork()
        if pid == 0:
            for j, pair in enumerate(pairs):
                if j != i:
                    for fd in pair:
                        os.close(fd)
            _serve(*pairs[i])
        kids.append(pid)
    for pair in pairs[1:]:
        for fd in pair:
            os.close(fd)
    _serve(*pairs[0], kids=kids)


def _serve(fd_in: int, fd_out: int, kids: list | None = None) -> None:
    """A worker: read (chunk, ctx) frames from ``fd_in`` until it closes, answer (ok, result) frames on
    ``fd_out``; then wait for ``kids`` (forked workers) and exit.

    A thread drains the input into a queue, so the parent never blocks writing a chunk while this
    process is writing a result."""
    import queue
    import threading
    import traceback

    inbox: queue.Queue = queue.Queue()
    stdin, stdout = os.fdopen(fd_in, "rb", buffering=0), os.fdopen(fd_out, "wb")

    def reader() -> None:
        while True:
            head = _read_exact(stdin, 8)
            data = None if head is None else _read_exact(stdin, int.from_bytes(head, "little"))
            if data is None:
                inbox.put(None)
                return
            inbox.put(_Frames.load(data))

    threading.Thread(target=reader, daemon=True).start()
    try:
        while (item := inbox.get()) is not None:
            chunk, ctx = item
            try:
                _send(stdout, (True, process(chunk, ctx, for_worker=True)))
            except Exception as exc:  # reported to the parent, which raises it there
                _send(stdout, (False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"))
        stdout.flush()
    except OSError:  # the parent stopped listening (it failed, or gave up): nothing more to do
        pass
    finally:
        for pid in kids or ():
            os.waitpid(pid, 0)
        os._exit(0)  # nothing is left to clean up: skip tearing down numpy and pyarrow (~0.5 s)
