"""Opening an input file as a stream of its decompressed bytes: gzip and zstd are recognised by their
magic bytes (not the file name), and a truncated or corrupt stream is an ``InputError`` naming the file
and how far it decompressed (``readers`` reads every format through ``open_binary``).
"""

from __future__ import annotations

import contextlib
import gzip
import io
from collections.abc import Iterator
from pathlib import Path

from ..errors import InputError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def compression_of(path: Path) -> str | None:
    if path.is_dir():
        return None
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return None


class _Guarded(io.RawIOBase):
    """A decompressing stream whose truncation or corruption is an InputError naming the file and how
    far it decompressed (gzip, zlib and zstd raise EOFError, OSError or their own errors)."""

    def __init__(self, inner, comp: str, display: str):
        self.inner, self.comp, self.display, self.done = inner, comp, display, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        try:
            n = self.inner.readinto(b)
        except Exception as exc:  # noqa: BLE001 - every decoder error means the same to the user
            if isinstance(exc, InputError):
                raise
            raise InputError(
                f"the {self.comp} data is truncated or corrupt after {self.done:,} decompressed bytes "
                f"({type(exc).__name__}: {exc})",
                file=self.display,
                hint="re-create or re-download the file; `gzip -t FILE` / `zstd -t FILE` checks it",
            ) from None
        self.done += n or 0
        return n


@contextlib.contextmanager
def open_binary(path: Path, display: str | None = None) -> Iterator[io.BufferedIOBase]:
    """The decompressed bytes of ``path`` as a buffered stream (gzip/zstd recognised by magic)."""
    comp = compression_of(path)
    display = display or str(path)
    with open(path, "rb") as raw:
        if comp == "gzip":
            with gzip.GzipFile(fileobj=raw) as fh:
                yield io.BufferedReader(_Guarded(fh, comp, display), 1 << 20)
        elif comp == "zstd":
            import zstandard

            with zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True) as fh:
                yield io.BufferedReader(_Guarded(fh, comp, display), 1 << 20)
        else:
            yield io.BufferedReader(raw, 1 << 20) if not isinstance(raw, io.BufferedReader) else raw
