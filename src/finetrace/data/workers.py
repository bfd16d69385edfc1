"""Chunks of an input file, and the worker processes that clean them in order.

``chunks(path, fmt, opts)`` cuts a file into ``batches.Chunk`` work items without holding more than a
block: JSONL as ~4 MiB blocks of whole lines (with their first line number and byte offset), Parquet
as Arrow tables, every other format as groups of rows from its reader. ``Pool(...).map(chunks, ctx)``
yields ``batches.Cleaned`` results in input order, at most ``2 × workers`` chunks in flight, so memory
stays flat in the file size; with no workers it runs each chunk in this process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from .batches import Chunk, Cleaned, Ctx, process
from .compressed import compression_of
from .readers import ReadOptions, jsonl_chunks, parquet_tables, read_rows

AUTO_MIN_BYTES = 64 << 20  # smaller inputs: start-up of workers costs more than they save
AUTO_MAX_WORKERS = 4
# bytes of input per process above which the compiled MinHash pays for numba's import and loading its
# cached code in each process (~0.8 s of CPU); below it the numpy loop is faster overall
COMPILED_MIN_BYTES = 96 << 20
RECORDS_PER_CHUNK = 4096
JSONL_CHUNK_BYTES = 4 << 20
TABLE_ROWS = 8192


def chunks(path: Path, fmt: str, opts: ReadOptions) -> Iterator[Chunk]:
    if fmt == "jsonl":
        plain = str(path) if path.is_file() and compression_of(path) is None else None
        for line, offset, block, row in jsonl_chunks(path, opts, JSONL_CHUNK_BYTES):
            if block is None:
                yield Chunk("records", line, offset, [row])
            else:
                yield Chunk("jsonl", line, offset, block, source=plain, size=len(block))
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

    Each worker is ``python -m finetrace.data.workers``, fed chunks on stdin (pickle frames, rebuilt by an allow-list: ``_Frames``) and answering on
    stdout (a fresh interpreter: nothing of the caller's state, threads or model is inherited, and a
    caller's script is never re-imported). Chunks go round-robin, so results come back in input order.
    Workers are used only when every PII detector in use is a built-in one: a detector registered at
    run time lives in this process alone.
    """

    def __init__(self, workers: int, input_bytes: int, detectors: list):
        from . import pii

        if workers == 0:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            workers = min(AUTO_MAX_WORKERS, cpus) if input_bytes >= AUTO_MIN_BYTES and cpus > 1 else 1
        builtin = {id(d) for d in pii.BUILTIN}
        self.workers = workers if all(id(d) in builtin for d in detectors) else 1
        self.compiled = input_bytes >= COMPILED_MIN_BYTES * self.workers and _numba_installed()
        self.procs: list = []
        self.seq = 0  # chunks handed out so far, over every file of the import

    def __enter__(self) -> Pool:
        if self.workers > 1:
            import subprocess
            import sys

            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [_src_root(), os.environ.get("PYTHONPATH")])),
            }
            self.procs = [
                subprocess.Popen(
                    [sys.executable, "-c", "from finetrace.data.workers import _serve; _serve()"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env=env,
                )
                for _ in range(self.workers)
            ]
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except Exception:
                p.kill()
                p.wait()

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
            _send(self.procs[sent % w].stdin, (_ipc(chunk.by_reference()), ctx))
            sent += 1
        while received < sent:
            yield self._receive(received % w)
            received += 1

    def _receive(self, i: int) -> Cleaned:
        ok, value = _recv(self.procs[i].stdout)
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


def _recv(fh):
    head = fh.read(8)
    if len(head) < 8:
        return False, "it exited"
    n = int.from_bytes(head, "little")
    return _Frames.load(fh.read(n))


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


def _serve() -> None:
    """A worker: read (chunk, ctx) frames from stdin until it closes, answer (ok, result) frames.

    A thread drains stdin into a queue, so the parent never blocks writing a chunk while this
    process is writing a result."""
    import queue
    import sys
    import threading
    import traceback

    _no_pandas_in_pyarrow()

    inbox: queue.Queue = queue.Queue()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer

    def reader() -> None:
        while True:
            head = stdin.read(8)
            if len(head) < 8:
                inbox.put(None)
                return
            inbox.put(_Frames.load(stdin.read(int.from_bytes(head, "little"))))

    threading.Thread(target=reader, daemon=True).start()
    while (item := inbox.get()) is not None:
        chunk, ctx = item
        try:
            _send(stdout, (True, process(chunk, ctx, for_worker=True)))
        except Exception as exc:  # reported to the parent, which raises it there
            _send(stdout, (False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"))
    stdout.flush()
    os._exit(0)  # nothing is left to clean up: skip tearing down numpy and pyarrow (~0.5 s)


if __name__ == "__main__":
    _serve()
