"""The probe's accepted-but-should-not-be uploads: each is refused with its reason, nothing is stored, and
no upload is left in staging (any exception, not only a refusal, aborts a commit)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from finetrace.canonical import sha256_bytes
from finetrace.market import client
from finetrace.market.checks import Refused
from finetrace.market.client import RegistryError
from finetrace.market.registry import Conflict

from .test_hostile import WEIGHTS, _altered, _assert_nothing_stored, _lora_weights, good  # noqa: F401

pytestmark = pytest.mark.slow  # a published adapter and a live registry for the module (~12 s)

CFG = "adapter/adapter_config.json"


def _config(market, **changes) -> bytes:
    folder = market.pub.store.materialize(market.adapter.digest)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    return json.dumps(cfg).encode()


def _weights(market, fn) -> bytes:
    from safetensors.torch import save

    return save({k: fn(k, v) for k, v in _lora_weights(market).items()})


def _cases(market):
    import torch

    nan = _weights(market, lambda k, v: torch.full_like(v, float("nan")))

    def one_inf(k, v):
        if "lora_B" in k and "layers.1.self_attn.v_proj" in k:
            v = v.clone()
            v[3, 1] = float("inf")
        return v

    return {
        "lora_alpha 1e30": (
            dict(path=CFG, content=_config(market, lora_alpha=1e30)),
            "field 'lora_alpha': is 1e+30; it must be a finite number in (0, 4096]",
        ),
        "alpha_pattern 1e30": (
            dict(path=CFG, content=_config(market, alpha_pattern={"q_proj": 1e30})),
            "field 'alpha_pattern': 'q_proj': 1e+30 is not a finite number",
        ),
        "rank_pattern a list": (
            dict(path=CFG, content=_config(market, rank_pattern=[4, 4])),
            "field 'rank_pattern': must be a mapping of module name patterns to values, not list",
        ),
        "all-NaN weights": (dict(path=WEIGHTS, content=nan), "NaN or infinite value(s)"),
        "one infinity": (dict(path=WEIGHTS, content=_weights(market, one_inf)), "holds 1 NaN or infinite value(s)"),
        "peft_type LOHA": (
            dict(path=CFG, content=_config(market, peft_type="LOHA")),
            "field 'peft_type': is 'LOHA'; the tensors are LoRA weights",
        ),
        "use_dora without magnitudes": (
            dict(path=CFG, content=_config(market, use_dora=True)),
            "use_dora=True but the tensors are not DoRA",
        ),
        "a URL as base": (
            dict(path=CFG, content=_config(market, base_model_name_or_path="https://evil.example/m")),
            "field 'base_model_name_or_path': 'https://evil.example/m' is not a model name",
        ),
        "../ as base": (
            dict(path=CFG, content=_config(market, base_model_name_or_path="../../../etc/model")),
            "field 'base_model_name_or_path': '../../../etc/model' is not a model name",
        ),
    }


NAMES = [
    "lora_alpha 1e30",
    "alpha_pattern 1e30",
    "rank_pattern a list",
    "all-NaN weights",
    "one infinity",
    "peft_type LOHA",
    "use_dora without magnitudes",
    "a URL as base",
    "../ as base",
]


@pytest.mark.parametrize("case", NAMES)
def test_absurd_values_are_refused_cleanly(market, server, good, tmp_path, case):  # noqa: F811
    alter, reason = _cases(market)[case]
    pkg = _altered(market, good, tmp_path, **alter)
    with pytest.raises(RegistryError) as exc:
        client.upload(pkg, server.url, server.tokens["acme"])
    assert exc.value.status == 422, str(exc.value)
    assert reason in str(exc.value), str(exc.value)
    known = {e["digest"] for e in good.manifest["files"]}
    _assert_nothing_stored(
        server, "acme/hostile@1.0", [e["digest"] for e in pkg.manifest["files"] if e["digest"] not in known]
    )
    assert not any(server.registry.staging.iterdir()) if server.registry.staging.exists() else True


def test_files_that_do_not_hash_to_the_signed_adapter_digest_are_refused(market, server, good, tmp_path):  # noqa: F811
    other = _weights(market, lambda k, v: v * 0.5 if "lora_B" in k else v)  # valid weights, another adapter
    pkg = _altered(
        market,
        good,
        tmp_path,
        path=WEIGHTS,
        content=other,
        manifest_edit=lambda m: m["adapter"].update(digest=good.manifest["adapter"]["digest"]),
    )
    with pytest.raises(RegistryError) as exc:
        client.upload(pkg, server.url, server.tokens["acme"])
    assert exc.value.status == 422
    assert "hash to folder digest" in str(exc.value) and "not to the signed adapter digest" in str(exc.value)
    _assert_nothing_stored(server, "acme/hostile@1.0", [sha256_bytes(other)])


def test_declared_sizes_must_match_already_stored_objects(market, server, good):  # noqa: F811
    first = _altered(market, good, None, manifest_edit=lambda m: m["package"].update(version="7.0"))
    assert client.upload(first, server.url, server.tokens["acme"])["status"] in ("published", "exists")

    def lie(m):
        m["package"]["version"] = "7.1"
        card = next(f for f in m["files"] if f["path"].startswith("documents/model_card"))
        card["size"] += 1000  # an object the registry already has, never PUT again

    pkg = _altered(market, good, None, manifest_edit=lie)
    with pytest.raises(RegistryError) as exc:
        client.upload(pkg, server.url, server.tokens["acme"])
    assert exc.value.status == 422 and "the manifest declares" in str(exc.value), str(exc.value)
    with pytest.raises(Exception, match="no package"):
        server.registry.version("acme", "hostile", "7.1")


def test_an_unexpected_exception_aborts_the_commit_and_leaves_no_staging(market, server, good, monkeypatch):  # noqa: F811
    from finetrace.market import registry as reg_mod

    def boom(*a, **k):
        raise RuntimeError("checker crashed")

    monkeypatch.setattr(reg_mod, "check_adapter", boom)
    pkg = _altered(market, good, None, manifest_edit=lambda m: m["package"].update(version="8.0"))
    with pytest.raises(RegistryError) as exc:
        client.upload(pkg, server.url, server.tokens["acme"])
    assert exc.value.status == 500 and "internal error" in str(exc.value)
    with pytest.raises(Exception, match="no package"):
        server.registry.version("acme", "hostile", "8.0")
    staged = [p for p in server.registry.staging.rglob("*") if p.is_file()] if server.registry.staging.exists() else []
    assert staged == []
    monkeypatch.undo()
    assert client.upload(pkg, server.url, server.tokens["acme"])["status"] == "published"  # a clean retry works


def test_look_alike_names_of_another_publisher_are_refused(market, server, good):  # noqa: F811
    from finetrace.market import db

    reg = server.registry
    ref = good.manifest["package"]
    assert (
        client.upload(
            _altered(market, good, None, manifest_edit=lambda m: m["package"].update(version="9.0")),
            server.url,
            server.tokens["acme"],
        )["status"]
        == "published"
    )
    for i, look_alike in enumerate(("acrne", "acme-", "a.c.m.e")):  # rn for m; separators
        with pytest.raises(Conflict, match="looks like the existing namespace 'acme'"):
            reg.add_user(f"lookalike{i}", namespaces=[look_alike])
    with pytest.raises(Refused, match="bad package reference"):
        reg.add_user("lookalike9", namespaces=["\u0430cme"])  # a Cyrillic а: not even a valid name
    # a look-alike namespace that predates the rule: its packages may not mimic acme's
    with reg.Session.begin() as s:
        mallory = s.scalar(select(db.Account).where(db.Account.name == "mallory"))
        s.add(db.Namespace(name="acrne", owner_id=mallory.id))

    def mimic(m):
        m["package"].update(namespace="acrne", name=ref["name"].replace("l", "1", 1), version="1.0")

    pkg = _altered(market, good, None, manifest_edit=mimic)
    with pytest.raises(RegistryError) as exc:
        client.upload(pkg, server.url, server.tokens["mallory"])
    assert exc.value.status == 409 and f"looks like acme/{ref['name']}" in str(exc.value), str(exc.value)
