"""Whole-batch text work on Arrow string arrays: byte flags per row, NFC/whitespace normalisation,
exact keys and MinHash signatures, each giving bit-identical results to the per-row functions in
``clean.py`` (those stay the reference; rows the vectorised path cannot decide go through them).

An Arrow string array is one UTF-8 byte buffer plus ``n + 1`` offsets; most checks are a comparison
over the bytes and a ``searchsorted`` of the hits into the offsets (O(bytes), no Python per row)::

    data, offs = str_buffers(arr)            # uint8 (bytes,), int64 (n + 1,)
    rows_with(data == ord("@"), offs)        # bool (n,): rows holding an '@'
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SHINGLE = 5
LONG_TEXT = 512  # texts longer than this keep a consistent eighth of their shingles
# ASCII bytes that str.split()/str.strip() treat as whitespace (\t \n \v \f \r, \x1c-\x1f, space)
WS_BYTES = b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f "
IS_WS = np.zeros(256, bool)
IS_WS[list(WS_BYTES)] = True
WS_OR_HIGH = IS_WS.copy()
WS_OR_HIGH[0x80:] = True  # a non-ASCII first/last byte may be Unicode whitespace: ask Python
_WS_RUN = "[\\t\\n\\x0b\\x0c\\r\\x1c-\\x1f ]+"


def str_buffers(arr) -> tuple[np.ndarray, np.ndarray]:
    """(bytes as uint8, offsets as int64 of length n + 1) of a string/binary array without nulls."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    large = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    bufs = arr.buffers()
    offs = np.frombuffer(bufs[1], np.int64 if large else np.int32)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return data, offs.astype(np.int64)


def np_bools(mask: np.ndarray) -> pa.Array:
    """An Arrow boolean array of a numpy bool mask, built from its bits (``pa.array`` would first make
    pyarrow import pandas, ~2 s and ~50 MiB per process, to ask whether the mask is a pandas object)."""
    mask = np.asarray(mask, bool)
    return pa.Array.from_buffers(pa.bool_(), len(mask), [None, pa.py_buffer(np.packbits(mask, bitorder="little"))])


def np_ints(idx: np.ndarray) -> pa.Array:
    """An Arrow int64 array of numpy integers (see ``np_bools``)."""
    idx = np.ascontiguousarray(idx, np.int64)
    return pa.Array.from_buffers(pa.int64(), len(idx), [None, pa.py_buffer(idx)])


def pa_strings(texts: list, typ=None) -> pa.Array:
    """An Arrow string (or ``typ``: large_binary…) array of Python ``str``/``bytes`` without nulls, from its
    buffers (see ``np_bools``)."""
    typ = typ or pa.string()
    enc = [t.encode("utf-8", "surrogatepass") if isinstance(t, str) else t for t in texts]
    large = pa.types.is_large_string(typ) or pa.types.is_large_binary(typ)
    offs = np.zeros(len(enc) + 1, np.int64 if large else np.int32)
    np.cumsum([len(b) for b in enc], out=offs[1:])
    return pa.Array.from_buffers(typ, len(enc), [None, pa.py_buffer(offs), pa.py_buffer(b"".join(enc))])


def str_scalar(text: str | None) -> pa.Scalar:
    """An Arrow string scalar (None: a null) for compute kernels, without ``pa.scalar`` (see ``np_bools``)."""
    return pa.nulls(1, pa.string())[0] if text is None else pa_strings([text])[0]


def null_mask(arr) -> np.ndarray:
    """bool (n,): rows of an Arrow array that are null, from its validity bitmap."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if not arr.null_count:
        return np.zeros(len(arr), bool)
    bits = np.unpackbits(np.frombuffer(arr.buffers()[0], np.uint8), bitorder="little")
    return ~bits[arr.offset : arr.offset + len(arr)].astype(bool)


def rows_with(flags: np.ndarray, offs: np.ndarray) -> np.ndarray:
    """bool (n,): rows with at least one flagged byte."""
    out = np.zeros(len(offs) - 1, bool)
    pos = np.flatnonzero(flags)
    if len(pos):
        out[np.searchsorted(offs, pos, side="right") - 1] = True
    return out


def count_per_row(flags: np.ndarray, offs: np.ndarray) -> np.ndarray:
    """int (n,): flagged bytes per row."""
    pos = np.flatnonzero(flags)
    return np.bincount(np.searchsorted(offs, pos, side="right") - 1, minlength=len(offs) - 1)


def edge_bytes(data: np.ndarray, offs: np.ndarray, table: np.ndarray) -> np.ndarray:
    """bool (n,): rows that are empty or whose first or last byte is in ``table``."""
    lens = np.diff(offs)
    out = lens == 0
    ne = ~out
    if data.size:
        out[ne] = table[data[offs[:-1][ne]]] | table[data[offs[1:][ne] - 1]]
    return out


def normalize_array(arr, normalize_text) -> tuple[pa.Array, np.ndarray]:
    """(normalised array, bool (n,) rows changed), as ``normalize_text`` on every row.

    Only rows with a non-ASCII byte, a CR, or whitespace at either end can change: those alone go
    through ``normalize_text``.
    """
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    data, offs = str_buffers(arr)
    need = rows_with((data >= 0x80) | (data == 13), offs) | edge_bytes(data, offs, IS_WS)
    need &= np.diff(offs) > 0
    changed = np.zeros(len(arr), bool)
    if not need.any():
        return arr, changed
    idx = np.flatnonzero(need)
    old = arr.take(np_ints(idx)).to_pylist()
    new = [normalize_text(v) for v in old]
    diff = np.fromiter((a != b for a, b in zip(old, new)), bool, len(old))
    if diff.any():
        changed[idx[diff]] = True
        arr = pc.replace_with_mask(arr, np_bools(changed), pa_strings([v for v, d in zip(new, diff) if d], arr.type))
    return arr, changed


def blake64(arr) -> np.ndarray:
    """uint64 (n,): BLAKE2b-64 (little-endian) of each row's UTF-8 bytes, as ``clean.exact_key``."""
    data, offs = str_buffers(arr)
    mv = memoryview(data)
    o = offs.tolist()
    blake = hashlib.blake2b
    out = b"".join(blake(mv[a:b], digest_size=8).digest() for a, b in zip(o[:-1], o[1:]))
    return np.frombuffer(out, "<u8").astype(np.uint64)


def _prepare_one(t: str) -> bytes:
    return (" ".join(t.lower().split()).encode("utf-8") or b" ").ljust(SHINGLE)


def prepare_texts(arr) -> tuple[np.ndarray, np.ndarray]:
    """MinHash input per row: lower-cased, whitespace runs collapsed to one space, trimmed, at least
    ``SHINGLE`` bytes (space-padded), as ``_prepare_one``.

    One ``bytes.translate`` lower-cases the batch and turns ASCII whitespace into spaces; rows that
    need more (a non-ASCII byte, whitespace at an edge, a short row, and, when they are few, rows with
    a run of spaces) go through ``_prepare_one``; many rows with runs are collapsed in numpy."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    data, offs = str_buffers(arr)
    data, offs = data[offs[0] : offs[-1]], offs - offs[0]
    n = len(offs) - 1
    raw = data.tobytes()
    low = raw.translate(_LOWER_TABLE)
    lens = np.diff(offs)
    fix = (lens < SHINGLE) | edge_bytes(data, offs, IS_WS)
    if not raw.isascii():
        fix |= rows_with(data >= 0x80, offs)
    out_data = np.frombuffer(low, np.uint8)
    sp = out_data == 32
    runs = np.flatnonzero(sp[1:] & sp[:-1])  # the first space of each pair of spaces
    if len(runs):
        run_rows = np.zeros(n, bool)
        run_rows[np.searchsorted(offs, runs, side="right") - 1] = True
        run_rows &= ~fix
        if run_rows.sum() > max(16, n // 8):  # many: collapse in numpy, not row by row in Python
            return _collapse(data, offs)
        fix |= run_rows
    if not fix.any():
        return out_data, offs
    out = pa.Array.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offs), pa.py_buffer(low)])
    vals = arr.filter(np_bools(fix)).to_pylist()
    out = pc.replace_with_mask(out, np_bools(fix), pa_strings([_prepare_one(v) for v in vals], pa.large_binary()))
    return str_buffers(out)


def _collapse(data: np.ndarray, offs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``prepare_texts`` with whitespace runs collapsed in numpy (offsets from 0), for batches where
    many rows hold runs; rows it cannot settle (non-ASCII, short, whitespace at an edge) in Python."""
    n = len(offs) - 1
    ws = IS_WS[data]
    # a whitespace byte survives only after a non-space of its row; rows ending in a space go to Python
    drop = np.empty_like(ws)
    drop[:1] = ws[:1]
    np.logical_and(ws[1:], ws[:-1], out=drop[1:])
    starts = offs[:-1][offs[:-1] < len(data)]
    drop[starts] = ws[starts]
    keep = ~drop
    dpos = np.flatnonzero(drop)
    new_lens = np.diff(offs) - np.bincount(np.searchsorted(offs, dpos, side="right") - 1, minlength=n)
    new_offs = np.concatenate([[0], np.cumsum(new_lens)]).astype(np.int64)
    out_data = _LOWER[data[keep]]
    fix = rows_with(data >= 0x80, offs) | (new_lens < SHINGLE) | edge_bytes(data, offs, IS_WS)
    if not fix.any():
        return out_data, new_offs
    out = pa.Array.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(new_offs), pa.py_buffer(out_data)])
    texts = pa.Array.from_buffers(pa.large_string(), n, [None, pa.py_buffer(offs), pa.py_buffer(data)])
    vals = texts.filter(np_bools(fix)).to_pylist()
    out = pc.replace_with_mask(out, np_bools(fix), pa_strings([_prepare_one(v) for v in vals], pa.large_binary()))
    return str_buffers(out)


_LOWER = np.arange(256, dtype=np.uint8)
_LOWER[65:91] += 32
_LOWER[IS_WS] = 32
_LOWER_TABLE = _LOWER.tobytes()  # the same mapping for bytes.translate


def signatures(
    prepared: tuple[np.ndarray, np.ndarray], a32: np.ndarray, b32: np.ndarray, block_bytes: int = 1 << 16
) -> np.ndarray:
    """(n, P) uint32 MinHash signatures of prepared texts, a cache-sized block of rows at a time.

    Shingle hash: h = Σ_j byte[p+j]·16777619^(4-j) mod 2^32 over each 5-byte window inside one text,
    then a xor-shift mixer; slot k of a row's signature is min over its shingles of (a_k·h + b_k) mod 2^32.
    """
    data, offs = prepared
    n, P = len(offs) - 1, len(a32)
    out = np.full((n, P), np.iinfo(np.uint32).max, np.uint32)
    i = 0
    while i < n:
        j = int(np.searchsorted(offs, offs[i] + block_bytes, side="right")) - 1
        j = min(max(j, i + 1), n)
        _block(data[offs[i] : offs[j]], offs[i : j + 1] - offs[i], a32, b32, out[i:j])
        i = j
    return out


def _block(seg: np.ndarray, offs: np.ndarray, a32, b32, out: np.ndarray) -> None:
    a = seg.astype(np.uint32)
    m = len(a) - SHINGLE + 1
    if m <= 0:
        return
    h = a[:m].copy()
    with np.errstate(over="ignore"):
        for j in range(1, SHINGLE):  # polynomial hash of every 5-byte window (mod 2^32), then a mixer
            h *= np.uint32(16777619)
            h += a[j : j + m]
        h ^= h >> np.uint32(15)
        h *= np.uint32(0x2C1B3C6D)
        h ^= h >> np.uint32(12)
    lens = np.diff(offs)
    ends = offs[1:]
    keep = (h & np.uint32(7)) == 0
    short = lens <= LONG_TEXT
    if short.all():
        keep[:] = True
    elif short.any():
        keep |= np.repeat(short, lens)[:m]
    cross = (ends[:-1, None] - np.arange(1, SHINGLE, dtype=np.int64)[None, :]).ravel()
    keep[cross[(cross >= 0) & (cross < m)]] = False  # windows spanning two texts
    pos = np.flatnonzero(keep)
    if not len(pos):
        return
    own = np.searchsorted(ends, pos, side="right")
    v = np.empty((len(a32), len(pos)), np.uint32)  # (P, S): one multiply-add permutation of 2^32 per slot
    with np.errstate(over="ignore"):
        np.multiply(a32[:, None], h[pos][None, :], out=v)
        v += b32[:, None]
    counts = np.bincount(own, minlength=len(lens))
    nz = counts > 0
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out[nz] = np.minimum.reduceat(v, starts[nz], axis=1).T
