"""RFC 6962 / RFC 9162 Merkle tree hashing, inclusion proofs and consistency proofs.

    leaf hash  = SHA-256(0x00 || entry)
    node hash  = SHA-256(0x01 || left || right)
    MTH({})    = SHA-256("")
    MTH(D[n])  = node(MTH(D[0:k]), MTH(D[k:n]))  with k the largest power of two < n

The proof verifiers follow RFC 9162 §2.1.3.2 and §2.1.4.2 literally, so that an auditor can check
them against the RFC. Everything works on lists of 32-byte leaf hashes.
"""

from __future__ import annotations

import hashlib


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly smaller than n (n >= 2)."""
    k = 1
    while k << 1 < n:
        k <<= 1
    return k


def root(leaves: list[bytes]) -> bytes:
    """MTH over leaf hashes, computed bottom-up in O(n) (same result as the recursive definition)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    # The RFC tree is the left-balanced tree: combining pairs level by level and carrying an odd last
    # node up unchanged gives exactly MTH.
    level = list(leaves)
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def inclusion_proof(index: int, leaves: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) of RFC 6962 §2.1.1 for leaf ``index`` among ``leaves``."""
    n = len(leaves)
    if not 0 <= index < n:
        raise ValueError(f"leaf index {index} outside a tree of size {n}")
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return inclusion_proof(index, leaves[:k]) + [root(leaves[k:])]
    return inclusion_proof(index - k, leaves[k:]) + [root(leaves[:k])]


# duplicates: alike verify_consistency on purpose (RFC 9162's inclusion and consistency proof walks, each kept as the RFC writes it).
def verify_inclusion(index: int, size: int, leaf: bytes, proof: list[bytes], expected_root: bytes) -> bool:
    """RFC 9162 §2.1.3.2. Its loop has the same shape as ``verify_consistency``'s (§2.1.4.2) by the RFC's
    design: kept as two literal transcriptions of the RFC rather than one clever function."""
    if index >= size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while True:
                    fn >>= 1
                    sn >>= 1
                    if fn & 1 or fn == 0:
                        break
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == expected_root


def consistency_proof(m: int, leaves: list[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) of RFC 6962 §2.1.2: the old tree of size m is a prefix of the new one."""
    n = len(leaves)
    if not 0 < m <= n:
        raise ValueError(f"no consistency proof from size {m} to size {n}")

    def subproof(m: int, d: list[bytes], complete: bool) -> list[bytes]:
        n = len(d)
        if m == n:
            return [] if complete else [root(d)]
        k = _split(n)
        if m <= k:
            return subproof(m, d[:k], complete) + [root(d[k:])]
        return subproof(m - k, d[k:], False) + [root(d[:k])]

    return subproof(m, leaves, True)


# duplicates: alike verify_inclusion on purpose (RFC 9162's inclusion and consistency proof walks, each kept as the RFC writes it).
def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes, proof: list[bytes]) -> bool:
    """RFC 9162 §2.1.4.2 (its inner loop is the twin of ``verify_inclusion``'s, as in the RFC)."""
    if first > second or first == 0:
        return False
    if first == second:
        return not proof and first_root == second_root
    proof = list(proof)
    if first & (first - 1) == 0:  # first is an exact power of two
        proof.insert(0, first_root)
    if not proof:
        return False
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while True:
                    fn >>= 1
                    sn >>= 1
                    if fn & 1 or fn == 0:
                        break
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == first_root and sr == second_root


def consistency_proofs(sizes: list[int], leaves: list[bytes]) -> dict[int, list[bytes]]:
    """``{m: PROOF(m, D[n])}`` for many old sizes at once, sharing subtree roots (O(n + k log n) hashes).

    Same result as ``consistency_proof(m, leaves)`` for each ``m``; used to ship proofs from every stored
    checkpoint in an audit bundle.
    """
    memo: dict[tuple[int, int], bytes] = {}

    def mth(a: int, b: int) -> bytes:
        if (a, b) not in memo:
            if b - a == 1:
                memo[(a, b)] = leaves[a]
            else:
                k = _split(b - a)
                memo[(a, b)] = node_hash(mth(a, a + k), mth(a + k, b))
        return memo[(a, b)]

    def subproof(m: int, a: int, b: int, complete: bool) -> list[bytes]:
        if m == b - a:
            return [] if complete else [mth(a, b)]
        k = _split(b - a)
        if m <= k:
            return subproof(m, a, a + k, complete) + [mth(a + k, b)]
        return subproof(m - k, a + k, b, False) + [mth(a, a + k)]

    n = len(leaves)
    out = {}
    for m in sizes:
        if not 0 < m <= n:
            raise ValueError(f"no consistency proof from size {m} to size {n}")
        out[m] = subproof(m, 0, n, True)
    return out
