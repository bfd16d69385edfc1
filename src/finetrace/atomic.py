"""Atomic, durable file writes: nothing half-written is ever visible.

A write goes to a temporary file in the destination folder, is fsync'ed, renamed over the destination and
the folder is fsync'ed. A failed fsync raises; it is never retried and assumed good (the page cache may
have dropped the dirty pages, see the PostgreSQL "fsyncgate" discussion).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(dest: str | Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a binary file; on clean exit it replaces ``dest`` atomically, on error it vanishes."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(dest: str | Path, data: bytes, mode: int = 0o644) -> None:
    with atomic_writer(dest, mode) as fh:
        fh.write(data)


def write_text(dest: str | Path, text: str, mode: int = 0o644) -> None:
    write_bytes(dest, text.encode("utf-8"), mode)
