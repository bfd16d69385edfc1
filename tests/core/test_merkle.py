"""RFC 6962 tree hashing, inclusion and consistency proofs against the certificate-transparency vectors."""

import hashlib
import random

from finetrace.ledger import merkle

# Inputs and roots from certificate-transparency's merkle_tree_test (the RFC 6962 reference vectors).
LEAVES = [
    bytes.fromhex(h)
    for h in ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]
]
ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
PATHS = {
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
}


def leaf_hashes(n):
    return [merkle.leaf_hash(x) for x in LEAVES[:n]]


def test_empty_root_is_sha256_of_nothing():
    assert merkle.root([]) == hashlib.sha256(b"").digest()


def test_roots_match_reference_vectors():
    for n in range(1, 9):
        assert merkle.root(leaf_hashes(n)).hex() == ROOTS[n - 1], n


def test_inclusion_paths_match_reference_and_verify():
    hs = leaf_hashes(8)
    for (i, n), path in PATHS.items():
        proof = merkle.inclusion_proof(i, hs[:n])
        assert [p.hex() for p in proof] == path
        assert merkle.verify_inclusion(i, n, hs[i], proof, bytes.fromhex(ROOTS[n - 1]))


def test_inclusion_and_consistency_for_all_sizes_and_tampering():
    rng = random.Random(7)
    hs = [merkle.leaf_hash(rng.randbytes(8)) for _ in range(37)]
    for n in range(1, 38):
        r = merkle.root(hs[:n])
        for i in range(n):
            proof = merkle.inclusion_proof(i, hs[:n])
            assert merkle.verify_inclusion(i, n, hs[i], proof, r)
            assert not merkle.verify_inclusion(i, n, merkle.leaf_hash(b"x"), proof, r)
        for m in range(1, n + 1):
            proof = merkle.consistency_proof(m, hs[:n])
            assert merkle.verify_consistency(m, n, merkle.root(hs[:m]), r, proof), (m, n)
            if m < n:
                bad = hs[: m - 1] + [merkle.leaf_hash(b"evil")]
                assert not merkle.verify_consistency(m, n, merkle.root(bad), r, proof), (m, n)
