"""The MinHash code as it was before the batch rewrite (commit 97af2e7), frozen: the reference the new
``arrowtext.prepare_texts``/``signatures`` and ``MinHasher.sketch_and_bands`` must equal bit for bit,
so signatures, band keys, and so near-duplicate decisions and dataset digests, never change."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from finetrace.data.arrowtext import IS_WS, LONG_TEXT, SHINGLE, edge_bytes, np_bools, pa_strings, rows_with, str_buffers

_LOWER = np.arange(256, dtype=np.uint8)
_LOWER[65:91] += 32
_LOWER[IS_WS] = 32


def _prepare_one(t: str) -> bytes:
    return (" ".join(t.lower().split()).encode("utf-8") or b" ").ljust(SHINGLE)


def prepare_texts(arr) -> tuple[np.ndarray, np.ndarray]:
    """MinHash input per row: lower-cased, whitespace runs collapsed to one space, trimmed, at least
    ``SHINGLE`` bytes (space-padded), as ``_prepare_one``; ASCII rows in numpy, the rest in Python."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    data, offs = str_buffers(arr)
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
    vals = arr.filter(np_bools(fix)).to_pylist()
    out = pc.replace_with_mask(out, np_bools(fix), pa_strings([_prepare_one(v) for v in vals], pa.large_binary()))
    return str_buffers(out)


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


def sketch_and_bands(m, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``MinHasher.sketch_and_bands`` as it was."""
    sigs = signatures(prepare_texts(pa_strings(texts)), m.a32, m.b32)
    with np.errstate(over="ignore"):
        used = sigs[:, : m.bands * m.rows].astype(np.uint64).reshape(len(sigs), m.bands, m.rows)
        keys = (used * m.band_mix[None, None, :]).sum(axis=2)
        keys ^= np.arange(m.bands, dtype=np.uint64)[None, :] * np.uint64(0x9E3779B97F4A7C15)
    return (sigs & np.uint32(0xFF)).astype(np.uint8), keys
