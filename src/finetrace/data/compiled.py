"""The MinHash text preparation and signature loop compiled with numba (the ``fast`` extra), for large
imports.

``signatures(prepared, a32, b32)`` gives the same (n, P) uint32 array as ``arrowtext.signatures``, bit
for bit (the numpy path stays the reference and the fallback): per row, every 5-byte window's
polynomial hash h = Σ_j byte[p+j]·16777619^(4-j) mod 2^32 and xor-shift mixer, the windows of rows
longer than ``LONG_TEXT`` bytes kept only where h ≡ 0 (mod 8), and slot k = min (a_k·h + b_k) mod 2^32.
Every window's hash in one flat pass over the batch's bytes (vectorised; 4 bytes of scratch per input
byte), then per row the kept windows' minima, no (P, shingles) temporary: ~5x faster than numpy here.
``pii_gates(data, offs)`` gives ``pii._gates`` (the rows each built-in PII detector may match) in one
pass over the bytes, ``pii_runs`` one detector's windows of ``pii.windows`` in another.
``prepare_texts(arr)`` gives ``arrowtext.prepare_texts``'s bytes and offsets, also bit for bit.

``available()`` is False when numba is not installed (or fails to load); callers then use numpy.
The compiled code is cached on disk (``cache=True``), so a worker process loads it instead of
compiling it: ~0.3 s of CPU, plus ~0.4 s for numba's import, against ~1-2 s for the first compile on
a machine (hence ``workers.COMPILED_MIN_BYTES``).
"""

from __future__ import annotations

import numpy as np

from .arrowtext import LONG_TEXT, SHINGLE

_KERNEL: list = []  # [(signature kernel, preparation kernel)] once loaded, [None] when numba is unavailable


def _build():
    """Every kernel, compiled or loaded from numba's cache: (MinHash pair, preparation, PII gates, PII runs)."""
    import numba

    return _minhash_kernels(numba), _prepare_kernel(numba), *_pii_kernels(numba)


def _minhash_kernels(numba):
    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def window_hashes(data, out):  # pragma: no cover - compiled
        # every 5-byte window of the whole buffer, rows ignored: one flat loop LLVM vectorises (windows
        # that straddle two rows are computed and never read)
        mul = np.uint32(16777619)
        mix = np.uint32(0x2C1B3C6D)
        for p in range(len(data) - (SHINGLE - 1)):
            h = np.uint32(data[p])
            for j in range(1, SHINGLE):
                h = np.uint32(h * mul + data[p + j])
            h ^= h >> np.uint32(15)
            h = np.uint32(h * mix)
            h ^= h >> np.uint32(12)
            out[p] = h

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def kernel(hashes, offs, a32, b32, long_text, buf, out):  # pragma: no cover - compiled
        n = len(offs) - 1
        P = len(a32)
        for r in range(n):
            s = offs[r]
            e = offs[r + 1]
            m = e - s - (SHINGLE - 1)
            if m <= 0:
                continue
            k = 0
            if e - s > long_text:  # long rows keep the windows with h ≡ 0 (mod 8), in order
                for p in range(m):
                    h = hashes[s + p]
                    buf[k] = h
                    k += (h & np.uint32(7)) == 0
            else:
                for p in range(m):
                    buf[p] = hashes[s + p]
                k = m
            for q in range(P):  # a min-reduction over the kept windows: vectorised by LLVM
                a = a32[q]
                b = b32[q]
                best = np.uint32(0xFFFFFFFF)
                for t in range(k):
                    best = min(best, np.uint32(a * buf[t] + b))  # wraps mod 2^32
                out[r, q] = best

    return window_hashes, kernel


def _prepare_kernel(numba):
    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def prepare(data, offs, lower, out, out_offs, fix):  # pragma: no cover - compiled
        # branch-free per ASCII byte: every byte is written (``lower`` maps whitespace to a space), and
        # the write position moves on unless it is whitespace after whitespace; a row starts "after
        # whitespace" (leading runs vanish) and a trailing space is taken back at its end
        n = len(offs) - 1
        w = 0
        for r in range(n):
            start = w
            prev = True
            plain = True
            for p in range(offs[r], offs[r + 1]):
                c = data[p]
                if c >= 0x80:  # non-ASCII: str.lower()/split() decide, in Python
                    plain = False
                    break
                v = lower[c]
                ws = v == 32
                out[w] = v
                w += not (ws and prev)
                prev = ws
            if not plain:
                fix[r] = True
                w = start
            else:
                if prev and w > start:  # the trailing run's one space
                    w -= 1
                if w == start:  # `or b" "`
                    out[w] = 32
                    w += 1
                while w - start < SHINGLE:  # `.ljust(5)`
                    out[w] = 32
                    w += 1
            out_offs[r + 1] = w
        return w

    return prepare


def _pii_kernels(numba):
    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def gate_counts(data, offs, cls, out):  # pragma: no cover - compiled
        # per row: digits, '@', ':', '.', whether "::" starts in it, whether two capitals before two
        # digits start in it (the next bytes may lie in the next row, as in pii._gates). ``cls`` sorts
        # the bytes (0: none of these, the common case, skipped at once)
        n = len(offs) - 1
        size = len(data)
        for r in range(n):
            digits = at = colon = dot = dcolon = iban = 0
            for p in range(offs[r], offs[r + 1]):
                t = cls[data[p]]
                if t == 0:
                    continue
                if t == 1:
                    digits += 1
                elif t == 5:
                    if p + 3 < size and cls[data[p + 1]] == 5 and cls[data[p + 2]] == 1 and cls[data[p + 3]] == 1:
                        iban = 1
                elif t == 3:
                    colon += 1
                    if p + 1 < size and data[p + 1] == 58:
                        dcolon = 1
                elif t == 4:
                    dot += 1
                else:
                    at += 1
            out[0, r] = digits
            out[1, r] = at
            out[2, r] = colon
            out[3, r] = dot
            out[4, r] = dcolon
            out[5, r] = iban

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def runs(data, offs, cls, counted, least):  # pragma: no cover - compiled
        # per row, the maximal runs of bytes in ``cls`` holding at least ``least`` ``counted`` bytes:
        # (row, start, endpos) with endpos one byte past the run (not past the row), offsets in the row
        total = 0
        for p in range(offs[0], offs[len(offs) - 1]):
            total += counted[data[p]]
        cap = total // max(least, 1) + 1  # each kept run holds ``least`` counted bytes of its own
        rows = np.empty(cap, np.int64)
        starts = np.empty(cap, np.int64)
        ends = np.empty(cap, np.int64)
        m = 0
        for r in range(len(offs) - 1):
            s = offs[r]
            e = offs[r + 1]
            p = s
            while p < e:
                if not cls[data[p]]:
                    p += 1
                    continue
                a = p
                c = 0
                while p < e and cls[data[p]]:
                    c += counted[data[p]]
                    p += 1
                if c >= least:
                    rows[m] = r
                    starts[m] = a - s
                    ends[m] = min(p + 1, e) - s
                    m += 1
        return rows[:m], starts[:m], ends[:m]

    return gate_counts, runs


def available() -> bool:
    """True when the compiled kernel can be used (numba installed and loading)."""
    if not _KERNEL:
        try:
            _KERNEL.append(_build())
        except Exception:  # numba absent or broken: the numpy path is used
            _KERNEL.append(None)
    return _KERNEL[0] is not None


def warm() -> None:
    """Load every kernel (from numba's cache, or compiled) by running it on a tiny batch, ASCII and not,
    with the argument types the import passes, so that processes forked afterwards have them loaded."""
    if not available():
        return
    from .arrowtext import pa_strings, str_buffers

    for texts in (["warm up: a@b.example +1 555-123-4567"], ["café ok", "plain"]):
        arr = pa_strings(texts)
        signatures(prepare_texts(arr), np.ones(64, np.uint32), np.zeros(64, np.uint32))
        pii_gates(*str_buffers(arr))
        pii_runs(*str_buffers(arr), np.ones(256, np.bool_), np.ones(256, np.bool_), 1)


def signatures(prepared: tuple[np.ndarray, np.ndarray], a32: np.ndarray, b32: np.ndarray) -> np.ndarray:
    """(n, P) uint32 MinHash signatures of prepared texts (``arrowtext.prepare_texts``), compiled."""
    data, offs = prepared
    n = len(offs) - 1
    out = np.full((n, len(a32)), np.iinfo(np.uint32).max, np.uint32)
    if n:
        data = np.ascontiguousarray(data, np.uint8)
        offs = np.ascontiguousarray(offs, np.int64)
        hashes = np.empty(len(data), np.uint32)
        window_hashes, kernel = _KERNEL[0][0]
        window_hashes(data, hashes)
        buf = np.empty(max(int(np.diff(offs).max()), 1), np.uint32)
        kernel(
            hashes,
            offs,
            np.ascontiguousarray(a32, np.uint32),
            np.ascontiguousarray(b32, np.uint32),
            LONG_TEXT,
            buf,
            out,
        )
    return out


_GATE_CLASSES = np.zeros(256, np.uint8)  # the bytes pii._gates looks at: 1 digit, 2 @, 3 :, 4 ., 5 A-Z
_GATE_CLASSES[48:58] = 1
_GATE_CLASSES[64] = 2
_GATE_CLASSES[58] = 3
_GATE_CLASSES[46] = 4
_GATE_CLASSES[65:91] = 5


def pii_gates(data: np.ndarray, offs: np.ndarray) -> list:
    """``pii._gates(data, offs)`` (per built-in detector, bool (n,)), in one compiled pass over the bytes."""
    n = len(offs) - 1
    c = np.zeros((6, n), np.int64)
    if n:
        _KERNEL[0][2](np.ascontiguousarray(data, np.uint8), np.ascontiguousarray(offs, np.int64), _GATE_CLASSES, c)
    digits, at, colon, dot, dcolon, iban = c
    return [
        at > 0,
        digits >= 13,
        (digits >= 6) & (iban > 0),
        digits >= 9,
        (digits >= 4) & (dot >= 3),
        (colon >= 3) | (dcolon > 0),
        digits >= 8,
    ]


def pii_runs(data: np.ndarray, offs: np.ndarray, cls: np.ndarray, counted: np.ndarray, least: int) -> tuple:
    """One detector's windows of ``pii.windows`` (``(row, start, endpos)`` int64 arrays), in one compiled
    pass over the bytes: the runs of ``cls`` bytes with at least ``least`` ``counted`` bytes."""
    if len(offs) < 2:
        none = np.zeros(0, np.int64)
        return none, none, none
    return _KERNEL[0][3](
        np.ascontiguousarray(data, np.uint8),
        np.ascontiguousarray(offs, np.int64),
        np.ascontiguousarray(cls, np.bool_),
        np.ascontiguousarray(counted & cls, np.bool_),  # only those in a run count (a tighter capacity)
        int(least),
    )


def prepare_texts(arr) -> tuple[np.ndarray, np.ndarray]:
    """``arrowtext.prepare_texts`` (lower-cased, whitespace runs collapsed, trimmed, padded to 5 bytes),
    compiled: ASCII rows in one pass over the bytes; rows with a non-ASCII byte through
    ``arrowtext._prepare_one`` (Unicode lower-casing and whitespace), as there."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from .arrowtext import _LOWER, _prepare_one, np_bools, pa_strings, str_buffers

    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    data, offs = str_buffers(arr)
    n = len(offs) - 1
    out = np.empty(int(offs[-1] - offs[0]) + SHINGLE * n, np.uint8)
    out_offs = np.zeros(n + 1, np.int64)
    fix = np.zeros(n, np.bool_)
    w = _KERNEL[0][1](data, offs, _LOWER, out, out_offs, fix)
    if not fix.any():
        return out[:w], out_offs
    res = pa.Array.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(out_offs), pa.py_buffer(out[:w])])
    vals = arr.filter(np_bools(fix)).to_pylist()
    res = pc.replace_with_mask(res, np_bools(fix), pa_strings([_prepare_one(v) for v in vals], pa.large_binary()))
    return str_buffers(res)
