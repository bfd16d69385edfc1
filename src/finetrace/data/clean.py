"""Cleaning: text normalisation, exact duplicate keys and MinHash/LSH near-duplicate detection.

- ``normalize_row``: Unicode NFC, CRLF/CR → LF, surrounding whitespace trimmed, on every text field.
- ``exact_key``: a 64-bit key (BLAKE2b) of the row's schema fields; equal rows have equal keys.
- ``MinHasher``: signatures over character 5-gram shingles of the row's text (lower-cased, whitespace
  collapsed); LSH with ``bands × rows`` chosen so that the S-curve threshold (1/b)^(1/r) is near the
  requested Jaccard threshold. Candidate pairs (same key in some band) are then confirmed by the
  signature estimate of Jaccard similarity ≥ threshold. During the import only 8-byte keys per row stay
  in memory; band keys and a 64-byte signature sketch per row go to scratch files, read back one band
  (8 bytes/row) and the sketch (64 bytes/row) at a time to find and confirm pairs.

The maths: for a random permutation π, P[min π(A) = min π(B)] = |A∩B| / |A∪B| (Jaccard), so the
fraction of equal signature slots estimates it; a pair lands in the same bucket of at least one band
with probability 1 - (1 - s^r)^b.
"""

from __future__ import annotations

import hashlib
import unicodedata
from pathlib import Path

import numpy as np

from . import compiled as _compiled
from .arrowtext import pa_strings, prepare_texts, signatures

NUM_PERM = 64
SHINGLE = 5
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def normalize_text(s: str) -> str:
    if not s.isascii() and not unicodedata.is_normalized("NFC", s):
        s = unicodedata.normalize("NFC", s)
    if "\r" in s:
        s = s.replace("\r\n", "\n").replace("\r", "\n")
    return s.strip()


def text_fields(row: dict, schema: str) -> list[tuple[str, str]]:
    """(field path, text) of every free-text field of a row (what PII and near-dup look at)."""
    if schema == "chat":
        out = []
        for i, m in enumerate(row["messages"]):
            out.append((f"messages[{i}].content", m["content"]))
            if m.get("tool_calls"):  # tool-call arguments are free text too (PII, near-duplicates)
                out.append((f"messages[{i}].tool_calls", m["tool_calls"]))
        return out
    return [(f, row[f]) for f in ("prompt", "completion", "text", "chosen", "rejected") if f in row]


def normalize_row(row: dict, schema: str) -> bool:
    """Normalise text fields in place; True if anything changed."""
    changed = False
    if schema == "chat":
        for m in row["messages"]:
            new = normalize_text(m["content"])
            changed |= new != m["content"]
            m["content"] = new
    else:
        for f in ("prompt", "completion", "text", "chosen", "rejected", "label"):
            if f in row:
                new = normalize_text(row[f])
                changed |= new != row[f]
                row[f] = new
    return changed


def exact_key(row: dict, schema: str, fields: tuple[str, ...]) -> int:
    """64-bit BLAKE2b of the schema fields (unit separators between fields, roles and contents)."""
    if schema == "chat":
        content = "\x1e".join(
            f"{m['role']}\x1f{m['content']}" + (f"\x1f{m['tool_calls']}" if m.get("tool_calls") else "")
            for m in row["messages"]
        )
        if row.get("tools"):
            content += "\x1d" + row["tools"]
    else:
        content = "\x1e".join(row[f] for f in fields)
    return int.from_bytes(hashlib.blake2b(content.encode("utf-8"), digest_size=8).digest(), "little")


def lsh_params(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm whose S-curve threshold is closest to ``threshold``."""
    best = None
    for r in range(1, num_perm + 1):
        b = num_perm // r
        t = (1 / b) ** (1 / r)
        if best is None or abs(t - threshold) < best[0]:
            best = (abs(t - threshold), b, r)
    return best[1], best[2]


class MinHasher:
    """Signatures and LSH band keys for batches of texts, written to memory-mapped scratch files."""

    def __init__(self, threshold: float, scratch: Path | None, num_perm: int = NUM_PERM, compiled: bool = False):
        self.threshold = threshold
        # the numba signature loop (``compiled``), when asked for and installed: the same numbers
        self.compiled = compiled and _compiled.available()
        self.num_perm = num_perm
        self.bands, self.rows = lsh_params(threshold, num_perm)
        rng = np.random.default_rng(20260101)  # fixed: signatures must not depend on anything else
        self.a = rng.integers(1, 1 << 62, num_perm, dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, 1 << 62, num_perm, dtype=np.uint64)
        self.a32 = (self.a & np.uint64(0xFFFFFFFF)).astype(np.uint32) | np.uint32(1)
        self.b32 = (self.b & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        self.band_mix = rng.integers(1, 1 << 62, self.rows, dtype=np.uint64) | np.uint64(1)
        self.n = 0
        self._sig_fh, self._band_fhs = None, []
        if scratch is None:  # signatures only (a worker process): no scratch files
            return
        self.scratch = Path(scratch)
        # the low byte of each signature slot, for confirming candidates (64 bytes per row): two
        # unequal slots agree by chance with p = 1/256, so the estimate is J + (1 - J)/256
        self._sig_fh = open(self.scratch / "sketch.u8", "wb")
        # one file per band (column-major), so that reading a band touches only that band's keys
        self._band_fhs = [open(self.scratch / f"band{b}.u64", "wb") for b in range(self.bands)]
        self.n = 0

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(N, num_perm) uint32 MinHash signatures of ``texts``."""
        return signatures(prepare_texts(pa_strings(texts)), self.a32, self.b32)

    def sketch_and_bands(self, texts) -> tuple[np.ndarray, np.ndarray]:
        """(N, num_perm) uint8 sketch and (N, bands) uint64 band keys; ``texts`` a list or Arrow array."""
        arr = texts if not isinstance(texts, list) else pa_strings(texts)
        if self.compiled:
            sigs = _compiled.signatures(_compiled.prepare_texts(arr), self.a32, self.b32)
        else:
            sigs = signatures(prepare_texts(arr), self.a32, self.b32)
        with np.errstate(over="ignore"):
            used = sigs[:, : self.bands * self.rows].astype(np.uint64).reshape(len(sigs), self.bands, self.rows)
            keys = (used * self.band_mix[None, None, :]).sum(axis=2)  # (N, B), wraps mod 2^64
            keys ^= np.arange(self.bands, dtype=np.uint64)[None, :] * np.uint64(0x9E3779B97F4A7C15)
        return (sigs & np.uint32(0xFF)).astype(np.uint8), keys

    def add(self, texts) -> None:
        """Append signatures and band keys for ``texts`` (in row order)."""
        if len(texts):
            self.write(*self.sketch_and_bands(texts))

    def write(self, sketch: np.ndarray, keys: np.ndarray) -> None:
        """Append precomputed sketches and band keys (from ``sketch_and_bands``, maybe in a worker)."""
        self._sig_fh.write(np.ascontiguousarray(sketch).tobytes())
        for b, fh in enumerate(self._band_fhs):
            fh.write(np.ascontiguousarray(keys[:, b]).tobytes())
        self.n += len(sketch)

    def close(self) -> None:
        if self._sig_fh is None:
            return
        self._sig_fh.close()
        for fh in self._band_fhs:
            fh.close()

    def pairs(self, active: np.ndarray) -> list[tuple[int, int, float]]:
        """Confirmed near-duplicate pairs (first, other, estimated Jaccard) among rows with ``active``."""
        self.close()
        if self.n == 0:
            return []
        # read into memory (64 bytes/row): a memory map read at random rows maps whole neighbourhoods
        sigs = np.fromfile(self.scratch / "sketch.u8", np.uint8, count=self.n * self.num_perm)
        sigs = sigs.reshape(self.n, self.num_perm)
        all_active = bool(active.all())
        idx_active = np.arange(self.n) if all_active else np.flatnonzero(active)

        def band_pairs(band: int) -> tuple[dict, int]:
            col = np.fromfile(self.scratch / f"band{band}.u64", np.uint64, count=self.n)
            if not all_active:
                col = col[idx_active]
            order = np.argsort(col, kind="stable")
            sorted_keys = col[order]
            del col
            same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1]) + 1  # positions equal to previous
            if not len(same):
                return {}, 0
            starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
            del sorted_keys
            run_start = starts[np.searchsorted(starts, same, side="right") - 1]
            # each run member is compared with the run's first member (candidates are verified right
            # away, so only confirmed pairs are kept: memory stays O(rows), not O(candidates))
            i = idx_active[order[run_start]]
            j = idx_active[order[same]]
            del order, same, run_start
            lo, hi = np.minimum(i, j), np.maximum(i, j)
            found: dict[tuple[int, int], float] = {}
            for k in range(0, len(lo), 4096):  # estimated Jaccard = fraction of equal signature slots
                a, b = lo[k : k + 4096], hi[k : k + 4096]
                est = equal_fraction(sigs, a, b)
                ok = est >= self.threshold
                found.update(zip(zip(a[ok].tolist(), b[ok].tolist()), est[ok].tolist()))
            return found, len(lo)

        # bands are independent, and sorting releases the GIL: two threads (a pair found in several
        # bands has one estimate, so the result does not depend on which band found it first)
        from concurrent.futures import ThreadPoolExecutor

        confirmed: dict[tuple[int, int], float] = {}
        checked = 0
        with ThreadPoolExecutor(2, thread_name_prefix="finetrace-lsh") as pool:
            for found, n_checked in pool.map(band_pairs, range(self.bands)):
                confirmed.update(found)
                checked += n_checked
        self.candidates_checked = checked
        out = [(a, b, e) for (a, b), e in confirmed.items()]
        out.sort()
        return out


_LOW_BITS = np.uint64(0x0101010101010101)


def equal_fraction(sigs: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 (k,): the fraction of equal bytes of rows ``a`` and ``b`` of ``sigs`` (uint8 (n, P)),
    ``(sigs[a] == sigs[b]).mean(axis=1)`` to the bit. With P a multiple of 8 the rows are compared as
    uint64 words: the bits of each byte of ``x = wa ^ wb`` are or-ed into its lowest bit, and the
    multiply by 0x0101…01 sums those (at most 8) into the top byte: the unequal bytes of the word. The
    count over P bytes divided by P is exact in float64, as the mean of the bools is."""
    n, p = sigs.shape
    if p % 8 or not sigs.flags.c_contiguous:
        return (sigs[a] == sigs[b]).mean(axis=1)
    words = sigs.view(np.uint64)  # (n, P / 8)
    x = np.take(words, a, axis=0)  # (k, P / 8); take gathers rows several times faster than words[a]
    x ^= np.take(words, b, axis=0)
    x |= x >> np.uint64(4)
    x |= x >> np.uint64(2)
    x |= x >> np.uint64(1)
    x &= _LOW_BITS
    with np.errstate(over="ignore"):
        x *= _LOW_BITS  # wraps mod 2^64: the sum lands in the top byte
    unequal = (x >> np.uint64(56)).sum(axis=1)
    return (p - unequal) / p


def union_find_roots(n: int, base: np.ndarray, pairs: list[tuple[int, int]]) -> np.ndarray:
    """Root row index per row, where rows start in unit ``base[i]`` and ``pairs`` join units."""
    parent = base.astype(np.int64).copy()
    extra: dict[int, int] = {}

    def find(x: int) -> int:
        while True:
            p = extra.get(x, int(parent[x]))
            if p == x:
                return x
            x = p

    for a, b in pairs:
        ra, rb = find(int(base[a])), find(int(base[b]))
        if ra != rb:
            lo, hi = min(ra, rb), max(ra, rb)
            extra[hi] = lo
    for k, v in extra.items():
        parent[k] = v
    while True:  # pointer jumping until every row points at its root
        nxt = parent[parent]
        if np.array_equal(nxt, parent):
            return parent
        parent = nxt
