"""The hostile-upload corpus: each upload is refused with its precise reason, and nothing is stored."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile

import pytest

from finetrace.canonical import sha256_bytes
from finetrace.ledger.signing import public_to_b64
from finetrace.market import client
from finetrace.market.client import RegistryError
from finetrace.market.package import adapter_files, sign
from finetrace.store import ObjectStore

pytestmark = pytest.mark.slow  # builds and signs a package of a trained adapter for the module (~13 s)

WEIGHTS = "adapter/adapter_model.safetensors"


def safetensors_bytes(tensors: dict, data: bytes | None = None, header_pad: int = 0) -> bytes:
    """Hand-built safetensors: ``tensors`` {name: (dtype, shape, [begin, end])}."""
    header = {k: {"dtype": d, "shape": s, "data_offsets": o} for k, (d, s, o) in tensors.items()}
    raw = json.dumps(header).encode() + b" " * header_pad
    if data is None:
        data = b"\0" * max((o[1] for _, _, o in tensors.values()), default=0)
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.fixture(scope="module")
def good(market, tmp_path_factory):
    """A valid package of the publisher's adapter (built once; each case copies and alters it)."""
    return client.build_package(
        market.pub, "legal-lora", "acme/hostile@1.0", domain=["legal"], description="target of the hostile corpus"
    )


def _altered(
    market,
    good,
    tmp_path,
    path: str | None = None,
    content: bytes | None = None,
    rename: str | None = None,
    manifest_edit=None,
    resign: bool = True,
) -> client.Package:
    manifest = json.loads(json.dumps(good.manifest))
    files = dict(good.files)
    if content is not None:
        f = tmp_path / "hostile.bin"
        f.write_bytes(content)
        files[path] = f
        for e in manifest["files"]:
            if e["path"] == path:
                e.update(size=len(content), digest=sha256_bytes(content))
    if rename is not None:
        files[rename] = files.pop(path)
        for e in manifest["files"]:
            if e["path"] == path:
                e["path"] = rename
    if content is not None or rename is not None:  # a careful forger re-derives the signed adapter digest
        manifest["adapter"]["digest"] = sha256_bytes(ObjectStore.manifest_bytes(adapter_files(manifest)))
    if manifest_edit:
        manifest_edit(manifest)
    sig = sign(manifest, market.pub.keys) if resign else good.signature
    return client.Package(manifest, sig, files)


def _assert_nothing_stored(server, ref: str, digests: list[str]) -> None:
    reg = server.registry
    ns, rest = ref.split("/")
    name, version = rest.split("@")
    with pytest.raises(Exception, match="no package"):
        reg.version(ns, name, version)
    for d in digests:
        assert not reg.store.has(d), f"{d} was stored"
        assert not any(p.name == d.split(":")[1] for p in reg.staging.rglob("*")), f"{d} was left in staging"


def _lora_weights(market) -> dict:
    from safetensors import safe_open

    folder = market.pub.store.materialize(market.adapter.digest)
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _cases(market):
    import torch
    from safetensors.torch import save

    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"x": 1}))
    good_st = save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)})
    w = _lora_weights(market)
    other_base = {
        k: torch.zeros(v.shape[0], 32) if "lora_A" in k else torch.zeros(32, v.shape[1]) for k, v in w.items()
    }
    foreign_module = dict(w)
    foreign_module["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    full_layer = dict(w)
    full_layer["base_model.model.lm_head.weight"] = torch.zeros(10, 64)
    return {
        "pickle renamed .safetensors": (
            dict(path=WEIGHTS, content=pickle.dumps({"w": [1.0] * 8}, protocol=4)),
            422,
            "content is a pickle",
        ),
        "zip in disguise": (dict(path=WEIGHTS, content=zbuf.getvalue()), 422, "content is a zip archive"),
        "overlapping offsets": (
            dict(
                path=WEIGHTS,
                content=safetensors_bytes(
                    {"a.lora_A.weight": ("F32", [4], [0, 16]), "b.lora_A.weight": ("F32", [4], [8, 24])}
                ),
            ),
            422,
            "overlaps",
        ),
        "trailing bytes": (dict(path=WEIGHTS, content=good_st + b"\0\0\0\0"), 422, "4 trailing bytes"),
        "oversized header": (
            dict(path=WEIGHTS, content=safetensors_bytes({}, header_pad=2 << 20)),
            422,
            "exceeds the 1048576-byte cap",
        ),
        "offsets past the end": (
            dict(path=WEIGHTS, content=safetensors_bytes({"a.lora_A.weight": ("F32", [4], [0, 16])}, data=b"\0" * 8)),
            422,
            "out of bounds",
        ),
        "unknown dtype": (
            dict(path=WEIGHTS, content=safetensors_bytes({"a.lora_A.weight": ("F33", [4], [0, 16])})),
            422,
            "unknown dtype 'F33'",
        ),
        "tensors for a different base": (
            dict(path=WEIGHTS, content=save(other_base)),
            422,
            "of the declared base (weight [",
        ),
        "a module the base lacks": (
            dict(path=WEIGHTS, content=save(foreign_module)),
            422,
            "targets module 'model.layers.9.self_attn.q_proj', which the declared base",
        ),
        "a full layer": (dict(path=WEIGHTS, content=save(full_layer)), 422, "is not a LoRA weight"),
        "modules_to_save": (
            dict(
                path="adapter/adapter_config.json",
                content=json.dumps({"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}).encode(),
            ),
            422,
            "modules_to_save ['lm_head'] would ship full layers",
        ),
        "rank over the cap": (
            dict(
                path="adapter/adapter_config.json",
                content=json.dumps({"r": 4096, "target_modules": ["q_proj"]}).encode(),
            ),
            422,
            "rank r=4096 exceeds",
        ),
        "code file": (dict(path=WEIGHTS, rename="adapter/loader.py"), 422, "'adapter/loader.py' is not allowed"),
        "path traversal": (dict(path=WEIGHTS, rename="adapter/../../../etc/cron.d/x"), 422, "unsafe file name"),
        "absolute path": (dict(path=WEIGHTS, rename="/etc/passwd"), 422, "unsafe file name"),
        "script in a document": (
            dict(path="documents/model_card.md", content=b"#!/bin/sh\nrm -rf /\n"),
            422,
            "content is a script",
        ),
        "bad signature": (
            dict(manifest_edit=lambda m: m.update(description="changed after signing"), resign=False),
            422,
            "signature check failed: bad signature on the package manifest",
        ),
        "forged checkpoint key": (
            dict(manifest_edit=lambda m: m["publisher"].update(public_key="A" * 43 + "=")),
            422,
            "signature",
        ),
        "a base with another digest in finetrace_adapter.json": (
            dict(
                path="adapter/finetrace_adapter.json", content=json.dumps({"base_model": "sha256:" + "0" * 64}).encode()
            ),
            422,
            "finetrace_adapter.json names base sha256:000",
        ),
    }


CASE_NAMES = [
    "pickle renamed .safetensors",
    "zip in disguise",
    "overlapping offsets",
    "trailing bytes",
    "oversized header",
    "offsets past the end",
    "unknown dtype",
    "tensors for a different base",
    "a module the base lacks",
    "a full layer",
    "modules_to_save",
    "rank over the cap",
    "code file",
    "path traversal",
    "absolute path",
    "script in a document",
    "bad signature",
    "forged checkpoint key",
    "a base with another digest in finetrace_adapter.json",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_hostile_upload_is_refused_and_nothing_is_stored(market, server, good, tmp_path, case):
    alter, status, reason = _cases(market)[case]
    pkg = _altered(market, good, tmp_path, **alter)
    with pytest.raises(RegistryError) as exc:
        client.upload(pkg, server.url, server.tokens["acme"])
    assert exc.value.status == status, str(exc.value)
    assert reason in str(exc.value), str(exc.value)
    known = {e["digest"] for e in good.manifest["files"]}
    changed = [e["digest"] for e in pkg.manifest["files"] if e["digest"] not in known]
    _assert_nothing_stored(server, "acme/hostile@1.0", changed)


def test_wrong_digest_is_refused_and_the_upload_can_resume(market, server, good):
    http = client._http(server.url, server.tokens["acme"])
    pkg = _altered(market, good, None, manifest_edit=lambda m: m["package"].update(version="1.1"))
    start = client._check(http.post("/api/v1/uploads", json={"manifest": pkg.manifest, "signature": pkg.signature}))
    assert start["missing"], "a fresh registry per test module: nothing of this package is stored yet"
    d = start["missing"][0]
    r = http.put(f"/api/v1/uploads/{start['upload']}/objects/{d}", content=b"not the bytes you signed")
    assert r.status_code == 422 and "the bytes received hash to sha256:" in r.json()["error"]
    assert not server.registry.store.has(sha256_bytes(b"not the bytes you signed"))
    res = client.upload(pkg, server.url, server.tokens["acme"])  # the right bytes still go through
    assert res["status"] == "published"


def test_an_object_not_in_the_manifest_is_refused(market, server, good):
    http = client._http(server.url, server.tokens["acme"])
    pkg = _altered(market, good, None, manifest_edit=lambda m: m["package"].update(version="1.2"))
    start = client._check(http.post("/api/v1/uploads", json={"manifest": pkg.manifest, "signature": pkg.signature}))
    junk = b"\x80\x04junk"
    r = http.put(f"/api/v1/uploads/{start['upload']}/objects/{sha256_bytes(junk)}", content=junk)
    assert r.status_code == 422 and "is not part of upload" in r.json()["error"]


def test_versions_are_immutable(market, server, good):
    first = client.upload(
        _altered(market, good, None, manifest_edit=lambda m: m["package"].update(version="3.0")),
        server.url,
        server.tokens["acme"],
    )
    assert first["status"] == "published"
    other = _altered(
        market,
        good,
        None,
        manifest_edit=lambda m: (m["package"].update(version="3.0"), m.update(description="something else")),
    )
    with pytest.raises(RegistryError, match=r"acme/hostile@3.0 is already published with a different digest") as exc:
        client.upload(other, server.url, server.tokens["acme"])
    assert exc.value.status == 409
    assert server.registry.version("acme", "hostile", "3.0")["digest"] == first["digest"]


def test_another_namespaces_token_is_refused(market, server, good):
    with pytest.raises(RegistryError, match="account 'mallory' may not publish into namespace 'acme'") as exc:
        client.upload(good, server.url, server.tokens["mallory"])
    assert exc.value.status == 403
    with pytest.raises(RegistryError, match="unknown API token") as exc:
        client.upload(good, server.url, "ftm_forged")
    assert exc.value.status == 401
    # mallory signs with her own key into her own namespace: fine; into acme with acme's token but her key: pinned
    from finetrace.workspace import Workspace

    mallory = Workspace.init(market.tmp / "mallory-ws")
    forged = _altered(
        market,
        good,
        None,
        manifest_edit=lambda m: (
            m["package"].update(version="6.6"),
            m["publisher"].update(public_key=public_to_b64(mallory.keys.public), key_id=mallory.keys.key_id),
        ),
        resign=False,
    )
    forged.signature = sign(forged.manifest, mallory.keys)
    client.upload(
        _altered(market, good, None, manifest_edit=lambda m: m["package"].update(version="0.0.1")),
        server.url,
        server.tokens["acme"],
    )  # pins acme's key if no earlier test did
    with pytest.raises(RegistryError, match="pinned to other publisher keys") as exc:
        client.upload(forged, server.url, server.tokens["acme"])
    assert exc.value.status == 403
    _assert_nothing_stored(server, "acme/hostile@6.6", [])
