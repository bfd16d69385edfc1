"""Publish → search → pull over loopback against a real registry server, and the pulled adapter in use."""

from __future__ import annotations

import json

import pytest

from finetrace.errors import InputError, IntegrityError, NotFoundError
from finetrace.market import client
from finetrace.market.client import RegistryError


def _publish(market, server, target, **kw):
    kw.setdefault("domain", ["legal"])
    kw.setdefault("task", ["classification"])
    kw.setdefault("description", "Contract clause classifier for termination and liability clauses")
    return client.publish(market.pub, "legal-lora", target, server.url, server.tokens["acme"], **kw)


@pytest.mark.slow
def test_publish_search_pull_roundtrip(market, server):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    res = _publish(market, server, "acme/legal-clauses@1.0.0")
    assert res["status"] == "published" and res["uploaded"] >= 9
    again = _publish(market, server, "acme/legal-clauses@1.0.0")
    assert again["status"] == "exists" and again["digest"] == res["digest"] and again["uploaded"] == 0

    # discovery: text, filters, metric thresholds
    hits = client.search(server.url, "contract", domain="legal", min_metric=["accuracy>=0.9"])["results"]
    assert [h["ref"] for h in hits] == ["acme/legal-clauses@1.0.0"]
    assert hits[0]["score"] == pytest.approx(0.93) and hits[0]["license"] == "Apache-2.0"
    assert client.search(server.url, "clause", min_metric=["accuracy>=0.99"])["results"] == []
    assert client.search(server.url, "contract", domain="medical")["results"] == []
    assert client.search(server.url, "", base=market.base.digest)["results"][0]["name"] == "legal-clauses"
    assert client.search(server.url, "termination liability")["results"][0]["name"] == "legal-clauses"
    # the last word is a prefix (search as you type); the others are whole words
    assert client.search(server.url, "termination liab")["results"][0]["name"] == "legal-clauses"
    assert client.search(server.url, "liab termination")["results"] == []
    if server.kind == "postgresql":  # the publish put its lexemes where prefixes are expanded from
        from finetrace.market.search import pg_tsquery

        with server.registry.engine.connect() as conn:
            assert pg_tsquery(conn, "termination & liab:*") == "'termin' & ( 'liabil' )"
    with pytest.raises(RegistryError, match="bad metric filter"):
        client.search(server.url, "x", min_metric=["accuracy>>1"])

    # the registry's badge
    info = client._check(client._http(server.url).get("/api/v1/packages/acme/legal-clauses/1.0.0"))
    assert info["badge"]["level"] == "verified", info["badge"]
    assert info["badge"]["inclusion"] and info["badge"]["attestation"] and info["badge"]["documents"]

    # pull: trust policy first
    with pytest.raises(IntegrityError, match="not a trusted key") as exc:
        client.pull(market.buyer, "acme/legal-clauses@1.0.0", server.url)
    assert market.pub.keys.key_id in exc.value.hint
    art = client.pull(market.buyer, "acme/legal-clauses@1.0.0", server.url, trust_keys=[market.pub.keys.key_id])
    assert art.digest == market.adapter.digest  # the same bytes the publisher signed
    assert art.kind == "adapter" and "acme/legal-clauses@1" in art.aliases
    assert art.metadata["base_model"] == market.base.digest and art.metadata["r"] == 4
    assert art.metadata["market"]["package"] == "acme/legal-clauses@1.0.0"
    run = market.buyer.ledger.get_run(art.run_id)
    assert run.kind == "pull" and run.status == "succeeded" and run.inputs == [market.base.digest]
    docs = [a for a in market.buyer.ledger.artifacts("document") if a.metadata.get("adapter") == art.digest]
    assert sorted(a.metadata["document"] for a in docs) == ["ab2013", "annex_iv", "attestation", "model_card"]
    assert client.search(server.url, "contract")["results"][0]["downloads"] >= 1

    # the pulled adapter loads with PEFT on the buyer's base and computes what the publisher's does
    folder = market.buyer.store.materialize(art.digest)
    pub_folder = market.pub.store.materialize(market.adapter.digest)
    ids = torch.tensor([[5, 17, 42, 7]])
    outs = []
    for f in (folder, pub_folder):
        base = AutoModelForCausalLM.from_pretrained(market.model_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(f)).eval()
        with torch.no_grad():
            outs.append(model(ids).logits)
    plain = AutoModelForCausalLM.from_pretrained(market.model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = plain(ids).logits
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], base_logits)  # the adapter does something


def test_pull_needs_the_base_and_the_license(market, server, tmp_path):
    from finetrace.workspace import Workspace

    terms = "Evaluation use only. No redistribution."
    _publish(market, server, "acme/legal-clauses-eval@0.1", license_id="custom", license_terms=terms)
    key = market.pub.keys.key_id
    with pytest.raises(InputError, match="must be accepted") as exc:
        client.pull(market.buyer, "acme/legal-clauses-eval@0.1", server.url, trust_keys=[key])
    assert terms in str(exc.value)
    bare = Workspace.init(tmp_path / "bare")
    with pytest.raises(NotFoundError, match="needs base model"):
        client.pull(bare, "acme/legal-clauses-eval@0.1", server.url, trust_keys=[key], accept_license=True)
    assert bare.ledger.artifacts("adapter") == []
    art = client.pull(market.buyer, "acme/legal-clauses-eval@0.1", server.url, trust_keys=[key], accept_license=True)
    last = market.buyer.ledger.runs("pull")[-1]  # same adapter bytes as the 1.0.0 pull: a new run, same artifact
    assert last.config["accepted_license"] is True and last.config["package"] == "acme/legal-clauses-eval@0.1"
    assert art.digest in last.outputs and "acme/legal-clauses-eval@1" in art.aliases
    with pytest.raises(RegistryError, match="no package") as exc:
        client.pull(market.buyer, "acme/nothing@1", server.url, trust_keys=[key])
    assert exc.value.status == 404


def test_a_publish_killed_midway_leaves_nothing_visible_and_resumes(market, server, tmp_path):
    from .conftest import add_evidence, make_adapter

    art = make_adapter(market.pub, market.base, market.tok, market.model_dir, tmp_path, name="resumed-lora", seed=7)
    add_evidence(market.pub, art, tmp_path, accuracy=0.88)
    pkg = client.build_package(
        market.pub, "resumed-lora", "acme/resumed@2.0", domain=["legal"], description="resumable upload"
    )
    http = client._http(server.url, server.tokens["acme"])
    start = client._check(http.post("/api/v1/uploads", json={"manifest": pkg.manifest, "signature": pkg.signature}))
    by_digest = {f["digest"]: pkg.files[f["path"]] for f in pkg.manifest["files"]}
    first = start["missing"][0]
    assert len(start["missing"]) >= 5  # new adapter, report and documents (the base shapes are in the manifest)
    client._check(http.put(f"/api/v1/uploads/{start['upload']}/objects/{first}", content=by_digest[first].read_bytes()))
    assert client.search(server.url, "resumable")["results"] == []
    assert http.get("/api/v1/packages/acme/resumed/2.0").status_code == 404
    r = http.post(f"/api/v1/uploads/{start['upload']}/commit")
    assert r.status_code == 422 and "not received yet" in r.json()["error"]
    assert not server.registry.store.has(first)  # staged, not stored, not served
    assert http.get(f"/api/v1/objects/{first}").status_code == 404
    # resume: the same manifest finds the same upload and only what is still missing
    res = client.upload(pkg, server.url, server.tokens["acme"])
    assert res["status"] == "published" and res["uploaded"] == len(start["missing"]) - 1
    assert client.search(server.url, "resumable")["results"][0]["ref"] == "acme/resumed@2.0"
    assert not any(server.registry.staging.rglob("*")) or all(p.is_dir() for p in server.registry.staging.rglob("*"))


def test_gates_and_documents_are_required(market, server, tmp_path):
    from finetrace.market.checks import REQUIRED_DOCUMENTS

    from .conftest import add_evidence, make_adapter

    sfx = 0 if server.kind == "sqlite" else 10  # the publisher workspace is shared by both databases' runs
    bad = make_adapter(
        market.pub, market.base, market.tok, market.model_dir, tmp_path, name=f"weak-lora-{sfx}", seed=3 + sfx
    )
    with pytest.raises(InputError, match="may not be published.*unevaluated|no evaluation"):
        client.build_package(market.pub, f"weak-lora-{sfx}", "acme/weak@1")
    add_evidence(market.pub, bad, tmp_path, accuracy=0.5, passed=False)
    with pytest.raises(InputError, match="eval gates failed"):
        client.build_package(market.pub, f"weak-lora-{sfx}", "acme/weak@1")
    nodocs = make_adapter(
        market.pub, market.base, market.tok, market.model_dir, tmp_path, name=f"nodoc-lora-{sfx}", seed=4 + sfx
    )
    add_evidence(market.pub, nodocs, tmp_path, docs=("model_card",))
    with pytest.raises(InputError, match="required documents missing: annex_iv, ab2013"):
        client.build_package(market.pub, f"nodoc-lora-{sfx}", "acme/nodoc@1")
    assert REQUIRED_DOCUMENTS == ("model_card", "annex_iv", "ab2013")
    # documents given explicitly complete it
    extra = {}
    for k in ("annex_iv", "ab2013"):
        extra[k] = tmp_path / f"{k}.md"
        extra[k].write_text(f"# {k}\n")
    pkg = client.build_package(market.pub, f"nodoc-lora-{sfx}", "acme/nodoc@1", documents=extra)
    assert {"documents/annex_iv.md", "documents/ab2013.md", "documents/model_card.md"} <= set(pkg.files)
    json.dumps(pkg.manifest)  # serialisable as is

    # documents generated without the intended use (the audit stage flags them) are refused...
    vague = make_adapter(
        market.pub, market.base, market.tok, market.model_dir, tmp_path, name=f"vague-lora-{sfx}", seed=5 + sfx
    )
    add_evidence(market.pub, vague, tmp_path)
    for kind in ("model_card", "annex_iv"):
        f = tmp_path / f"{kind}-vague.md"
        f.write_text(f"# {kind}\nAdapter {vague.digest}\nIntended use: not provided\n")
        market.pub.ledger.add_artifact(
            "document",
            market.pub.store.put_file(f),
            metadata={
                "adapter": vague.digest,
                "document": kind,
                "intended_use_missing": ["intended_use", "limitations"],
            },
        )
    with pytest.raises(InputError, match="lack the intended use and limitations"):
        client.build_package(market.pub, f"vague-lora-{sfx}", "acme/vague@1")
    # ...until they are generated again with it
    for kind in ("model_card", "annex_iv"):
        f = tmp_path / f"{kind}-clear.md"
        f.write_text(f"# {kind}\nAdapter {vague.digest}\nIntended use: clause triage by trained reviewers\n")
        market.pub.ledger.add_artifact(
            "document",
            market.pub.store.put_file(f),
            metadata={"adapter": vague.digest, "document": kind, "intended_use_missing": []},
        )
    assert client.build_package(market.pub, f"vague-lora-{sfx}", "acme/vague@1").manifest


@pytest.mark.slow
def test_a_pulled_adapter_trains_further(market, server, tmp_path):
    """The buyer adds the last 20%: `init_from` the pulled adapter, on their own data."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from finetrace.train import TrainConfig, train

    if server.kind != "sqlite":
        pytest.skip("training is the same whichever database the registry uses")
    _publish(market, server, "acme/legal-base@1.0")
    pulled = client.pull(
        market.buyer, "acme/legal-base@1.0", server.url, trust_keys=[market.pub.keys.key_id], name="legal-market"
    )
    ds = tmp_path / "own-data"
    ds.mkdir()
    rows = [
        {"prompt": f"Clause {i}: the supplier shall deliver", "completion": "termination" if i % 2 else "liability"}
        for i in range(8)
    ]
    pq.write_table(pa.Table.from_pylist(rows), ds / "train.parquet")
    (ds / "dataset.json").write_text(
        json.dumps(
            {"schema": "completion", "columns": ["prompt", "completion"], "labels": None, "counts": {"train": 8}}
        )
    )
    data = market.buyer.ledger.add_artifact("dataset", market.buyer.store.put_dir(ds), name="own-legal")
    cfg = TrainConfig(
        base_model="tiny",
        dataset=data.ref,
        init_from=pulled.ref,
        output_name="legal-further",
        max_steps=2,
        batch_size=4,
        validation_split=None,
        threads=1,
    )
    child = train(market.buyer, cfg)
    assert child.metadata["parent"] == pulled.digest and child.metadata["r"] == 4
    run = market.buyer.ledger.get_run(child.run_id)
    assert pulled.digest in run.inputs and run.status == "succeeded"
    # lineage runs back through the pull to the registry package
    pull_run = market.buyer.ledger.get_run(market.buyer.ledger.producer(pulled.digest))
    assert pull_run.kind == "pull"
    # the pulled and the further-trained adapters evaluate side by side against the base...
    from finetrace.evaluate import Suite, compare, load_report

    # the default suite without its counterfactual bias pass (thousands of decode steps; tested in tests/evaluate)
    suite = Suite.model_validate({"bias": {"enabled": False}})
    rep = compare(market.buyer, "tiny", [pulled.ref, child.ref], f"{data.ref}:train", suite=suite)
    doc = load_report(market.buyer, rep.digest)
    assert [m["adapter"] for m in doc["models"]] == [None, pulled.digest, child.digest]
    erun = market.buyer.ledger.get_run(rep.run_id)
    assert erun.kind == "evaluate" and {pulled.digest, child.digest, data.digest} <= set(erun.inputs)
    # ... and the pulled and the further-trained adapters serve, the pulled one exactly as the publisher's
    from finetrace.serve.engine import Engine
    from finetrace.serve.settings import ServeSettings

    texts = {}
    for ws, refs in ((market.buyer, [pulled.ref, child.ref]), (market.pub, ["legal-lora@1"])):
        eng = Engine(ws, "tiny", refs, ServeSettings(max_batch=4))
        eng.start()
        try:
            for r in refs:
                texts[r] = eng.generate(r, prompt="The supplier shall", max_tokens=8).text
        finally:
            eng.stop()
    assert texts[pulled.ref] == texts["legal-lora@1"]
    assert isinstance(texts[child.ref], str)
