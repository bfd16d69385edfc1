"""Canonical JSON and SHA-256 digests: the one place where bytes become names.

Canonical JSON here is sorted keys, no insignificant whitespace, UTF-8, no NaN/Infinity (the subset of
RFC 8785 that our values use: strings, integers, finite floats, bools, null, lists, dicts). Digests are
written ``sha256:<64 hex>`` everywhere.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, BinaryIO

from .errors import InputError

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
CHUNK = 1 << 20


def canonical_json(value: Any) -> bytes:
    """Serialise ``value`` deterministically (sorted keys, compact separators, UTF-8, no NaN)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_stream(fh: BinaryIO) -> tuple[str, int]:
    """Digest and size of everything left in ``fh``, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    while chunk := fh.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return sha256_stream(fh)[0]


def check_digest(text: str) -> str:
    """Return ``text`` if it is a full ``sha256:<hex>`` digest, else raise InputError."""
    if not DIGEST_RE.match(text):
        raise InputError(f"not a digest: {text!r}", hint="expected sha256: followed by 64 hex digits")
    return text


def short(digest: str) -> str:
    """``sha256:abcdef…`` → ``abcdef123456`` for display."""
    return digest.split(":", 1)[-1][:12]
