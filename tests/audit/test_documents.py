"""Documents generated from a real pipeline run: model card, Annex IV, AB 2013, EU summary, ML-BOM,
attestation, approvals, and the CLI."""

from __future__ import annotations

import base64
import json

import pytest
import yaml
from cryptography.exceptions import InvalidSignature

from finetrace.audit import approve, generate_documents, latest_documents
from finetrace.audit.documents import ANNEX_IV_HEADINGS
from finetrace.errors import ConfigError, InputError, NotFoundError


def _docs(ws, adapter_digest) -> dict[str, dict[str, bytes]]:
    out = {}
    for kind, art in latest_documents(ws, adapter_digest).items():
        out[kind] = {e.path: ws.store.read_bytes(e.digest) for e in ws.store.tree(art.digest)}
    return out


def _report(ws, ref):
    from finetrace.evaluate import load_report

    return load_report(ws, ref)


def test_every_document_is_recorded_with_lineage_to_the_adapter(audit_env):
    ws, g = audit_env
    adapter = g["digests"]["adapter"]
    docs = latest_documents(ws, adapter)
    assert set(docs) == {"model_card", "annex_iv", "ab2013", "eu_training_summary", "mlbom", "attestation"}
    run_ids = {a.run_id for a in docs.values()}
    assert len(run_ids) == 1
    run = ws.ledger.get_run(run_ids.pop())
    assert run.kind == "document" and run.status == "succeeded"
    assert adapter in run.inputs and g["digests"]["report"] in run.inputs and g["digests"]["data"] in run.inputs
    assert sorted(run.outputs) == sorted(a.digest for a in docs.values())
    assert all(a.kind == "document" and a.metadata["intended_use_missing"] == [] for a in docs.values())
    files = _docs(ws, adapter)
    assert set(files["model_card"]) == {"README.md", "README.html"}
    assert set(files["annex_iv"]) == {"annex_iv.md", "annex_iv.html"}
    assert set(files["mlbom"]) == {"mlbom.cdx.json"}


def test_annex_iv_has_every_point_filled_from_recorded_facts(audit_env):
    ws, g = audit_env
    files = _docs(ws, g["digests"]["adapter"])["annex_iv"]
    md, html = files["annex_iv.md"].decode(), files["annex_iv.html"].decode()
    for heading in ANNEX_IV_HEADINGS:
        assert f"\n## {heading}\n" in md, heading
        assert f"<h2>{heading}</h2>" in html, heading
    train = ws.ledger.get_run(ws.ledger.artifact(g["digests"]["adapter"]).run_id)
    rep = _report(ws, g["refs"]["report"])
    acc = next(m for m in rep["models"] if m.get("adapter"))["metrics"]["accuracy"]
    sections = md.split("\n## ")
    point2 = next(s for s in sections if s.startswith("2. "))
    # 2(c): compute from the train run's metrics; 2(d): the datasheet's given facts; 2(g): the eval report
    assert f"{train.metrics['flops_estimate']:.3e}" in point2 and f"{train.metrics['tokens']} tokens" in point2
    assert "Example Corp helpdesk export" in point2 and "2024-01 to 2024-06" in point2
    assert f"| accuracy | {acc['value']:.4g} |" in point2
    assert "Ada Lovelace approved report" in point2 and "Ed25519 signature" in point2
    assert "gender_names" in point2  # counterfactual bias results (discriminatory impacts)
    # facts nobody recorded are marked, with what would provide them
    point5 = next(s for s in sections if s.startswith("5. "))
    assert "*not provided* (would be provided by: `risk_management:`" in point5
    assert "Agents see the suggested queue" in md  # human_oversight from the intended-use file


def test_model_card_has_hub_metadata_and_mitchell_sections(audit_env):
    ws, g = audit_env
    card = _docs(ws, g["digests"]["adapter"])["model_card"]["README.md"].decode()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "tiny" and meta["base_model_relation"] == "adapter"
    assert meta["license"] == "apache-2.0" and meta["datasets"] == [g["refs"]["data"]]
    assert "lora" in meta["tags"] and meta["library_name"] == "peft"
    rep = _report(ws, g["refs"]["report"])
    acc = next(m for m in rep["models"] if m.get("adapter"))["metrics"]["accuracy"]["value"]
    result = meta["model-index"][0]["results"][0]
    assert result["metrics"] == [{"type": "accuracy", "name": "accuracy", "value": acc}]
    assert result["dataset"]["revision"] == g["digests"]["data"] and result["dataset"]["split"] == "test"
    for section in (
        "Model details",
        "Intended use",
        "Factors",
        "Metrics",
        "Evaluation data",
        "Training data",
        "Quantitative analyses",
        "Ethical considerations",
        "Caveats and recommendations",
    ):
        assert f"\n## {section}\n" in card, section
    from .pipeline import ROUTES

    labels = ", ".join(sorted(ROUTES))
    # how to prompt it: the training dataset's prompt format, as the adapter learnt it
    assert (
        f"Prompt format (labels-first, from `dataset.json`): each example was the user turn `Answer with one of: {labels}.\\n\\n<text>`"
        in card
    )
    from huggingface_hub import ModelCard  # the Hub's own parser reads the metadata and the eval results

    data = ModelCard(card).data
    assert data.base_model == "tiny" and data.license == "apache-2.0"
    (res,) = data.eval_results
    assert (res.metric_type, res.metric_value, res.dataset_split) == ("accuracy", acc, "test")
    sub = next(m for m in rep["models"] if m.get("adapter"))
    for group, v in sub["groups"]["accuracy"]["groups"].items():  # disaggregated by group
        assert f"| accuracy | {group} | {v['n']} | {v['value']:.4g} |" in card


def test_training_data_disclosures_come_from_the_datasheet(audit_env):
    ws, g = audit_env
    docs = _docs(ws, g["digests"]["adapter"])
    ab = docs["ab2013"]["ab2013.md"].decode()
    for i in range(1, 13):
        assert f"\n{i}. " in ab, f"AB 2013 item {i}"
    assert "1. Sources or owners: Example Corp helpdesk export (tickets.example.com); owner Example Corp" in ab
    assert "3. Number of data points: 40 rows" in ab
    assert "12. Synthetic data generation used: yes" in ab
    assert "7. Personal information: no" in ab
    assert "8. Aggregate consumer information: *not provided*" in ab
    train = ws.ledger.get_run(ws.ledger.artifact(g["digests"]["adapter"]).run_id)
    assert f"11. Dates the dataset was first used in development: {train.started}" in ab
    eu = docs["eu_training_summary"]["eu_training_summary.md"].decode()
    for part in ("## 1. General information", "## 2. List of data sources", "## 3. Relevant data processing aspects"):
        assert part in eu
    source = json.loads(
        ws.store.read_bytes(next(e.digest for e in ws.store.tree(g["digests"]["data"]) if e.path == "dataset.json"))
    )["sources"][0]
    assert source["digest"] in eu and "| CC-BY-4.0 |" in eu


def test_missing_intended_use_is_stated_and_flagged(audit_env):
    ws, g = audit_env
    arts = generate_documents(ws, g["refs"]["adapter"], intended_use=None, formats=("md",))
    assert {a.metadata["document"] for a in arts} >= {"model_card", "annex_iv", "mlbom", "attestation"}
    assert all(a.metadata["intended_use_missing"] == ["intended_use", "limitations"] for a in arts)
    run = ws.ledger.get_run(arts[0].run_id)
    assert run.metrics["intended_use_missing"] == ["intended_use", "limitations"]
    docs = _docs(ws, g["digests"]["adapter"])
    for kind, name in (("model_card", "README.md"), ("annex_iv", "annex_iv.md"), ("ab2013", "ab2013.md")):
        text = docs[kind][name].decode()
        assert "**Intended use and limitations were not provided**" in text
        assert "html" not in " ".join(docs[kind])  # md only was asked for
    card = docs["model_card"]["README.md"].decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["finetrace"]["intended_use_missing"] == ["intended_use", "limitations"] and meta["license"] == "other"
    assert "Primary intended use: *not provided* (would be provided by: `intended_use:`" in card


def test_bad_inputs_are_named(audit_env, tmp_path):
    ws, g = audit_env
    bad = tmp_path / "iu.yaml"
    bad.write_text("intended_use: x\nlimitation: y\n")
    with pytest.raises(ConfigError) as info:
        generate_documents(ws, g["refs"]["adapter"], intended_use=bad)
    assert "iu.yaml" in str(info.value) and "'limitation'" in str(info.value) and "'limitations'" in str(info.value)
    with pytest.raises(InputError, match="is a dataset, not an adapter"):
        generate_documents(ws, g["refs"]["data"])
    with pytest.raises(NotFoundError):
        generate_documents(ws, "no-such-adapter@1")
    with pytest.raises(InputError, match="unknown document format 'docx'"):
        generate_documents(ws, g["refs"]["adapter"], formats=("docx",))


@pytest.mark.slow
def test_mlbom_validates_against_the_cyclonedx_schema(audit_env):
    """Schema: the CycloneDX 1.6 JSON schema shipped in cyclonedx-python-lib (strict validator)."""
    from finetrace.audit import mlbom

    ws, g = audit_env
    bom = json.loads(_docs(ws, g["digests"]["adapter"])["mlbom"]["mlbom.cdx.json"])
    mlbom.validate(bom)
    assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.6"
    comps = {c["bom-ref"]: c for c in bom["components"]}
    for key, ctype in (("adapter", "machine-learning-model"), ("base", "machine-learning-model"), ("data", "data")):
        digest = g["digests"][key]
        assert comps[digest]["type"] == ctype
        assert comps[digest]["hashes"] == [{"alg": "SHA-256", "content": digest.split(":")[1]}]
        files = {e.path: e.digest.split(":")[1] for e in ws.store.tree(digest)}
        assert {c["name"]: c["hashes"][0]["content"] for c in comps[digest]["components"]} == files
    card = comps[g["digests"]["adapter"]]["modelCard"]
    assert card["modelParameters"]["datasets"] == [{"ref": g["digests"]["data"]}]
    assert any(
        m["type"] == "accuracy" and "confidenceInterval" in m
        for m in card["quantitativeAnalysis"]["performanceMetrics"]
    )
    assert bom["dependencies"] == [
        {"ref": g["digests"]["adapter"], "dependsOn": [g["digests"]["base"], g["digests"]["data"]]}
    ]
    bom["components"][0]["hashes"][0]["content"] = "not-a-sha256"
    with pytest.raises(Exception, match="CycloneDX 1.6 schema"):
        mlbom.validate(bom)


def test_attestation_verifies_with_securesystemslib(audit_env):
    """The DSSE envelope is checked by an independent implementation (securesystemslib.dsse)."""
    from securesystemslib.dsse import Envelope
    from securesystemslib.exceptions import VerificationError
    from securesystemslib.signer import SSlibKey

    from finetrace.audit.attest import verify_envelope
    from finetrace.errors import IntegrityError
    from finetrace.ledger.signing import raw_public

    ws, g = audit_env
    raw = _docs(ws, g["digests"]["adapter"])["attestation"]["attestation.dsse.json"]
    env = json.loads(raw)
    key = SSlibKey(ws.keys.key_id, "ed25519", "ed25519", {"public": raw_public(ws.public_key).hex()})
    accepted = Envelope.from_dict(json.loads(raw)).verify([key], 1)
    assert list(accepted) == [ws.keys.key_id]
    stmt = json.loads(base64.b64decode(env["payload"]))
    assert stmt["_type"] == "https://in-toto.io/Statement/v1"
    assert stmt["predicateType"] == "https://slsa.dev/provenance/v1"
    adapter_files = {e.path: e.digest.split(":")[1] for e in ws.store.tree(g["digests"]["adapter"])}
    assert {s["name"]: s["digest"]["sha256"] for s in stmt["subject"]} == adapter_files
    # finetrace itself has a digest (its git commit) only when the code runs from a git checkout
    deps = {d.get("digest", {}).get("sha256") for d in stmt["predicate"]["buildDefinition"]["resolvedDependencies"]}
    for key_name in ("base", "data"):
        assert {e.digest.split(":")[1] for e in ws.store.tree(g["digests"][key_name])} <= deps
    names = [d["name"] for d in stmt["predicate"]["buildDefinition"]["resolvedDependencies"]]
    assert "finetrace" in names and any(n.endswith("train.parquet") for n in names)
    assert (
        stmt["predicate"]["runDetails"]["metadata"]["invocationId"]
        == ws.ledger.artifact(g["digests"]["adapter"]).run_id
    )
    assert verify_envelope(env, ws.public_key) == stmt
    _check_with_in_toto_attestation(stmt)
    # one changed byte of the payload: both implementations refuse it
    stmt["subject"][0]["digest"]["sha256"] = "0" * 64
    env["payload"] = base64.b64encode(json.dumps(stmt).encode()).decode()
    with pytest.raises(VerificationError):
        Envelope.from_dict(json.loads(json.dumps(env))).verify([key], 1)
    with pytest.raises(IntegrityError, match="DSSE signature"):
        verify_envelope(env, ws.public_key)


def test_approval_is_signed_dated_and_named(audit_env):
    from finetrace.audit.approvals import approval_message

    ws, g = audit_env
    (entry,) = [e for e in ws.ledger.entries(type="approval")]
    d = entry.data
    assert d["by"] == "Ada Lovelace" and entry.actor == "Ada Lovelace"
    assert d["adapter"] == g["digests"]["adapter"] and d["report"] == g["digests"]["report"]
    assert d["date"][:4] == entry.time[:4] and d["key_id"] == ws.keys.key_id
    ws.public_key.verify(base64.b64decode(d["signature"]), approval_message(d))
    forged = {**d, "note": "approved everything"}
    with pytest.raises(InvalidSignature):
        ws.public_key.verify(base64.b64decode(d["signature"]), approval_message(forged))
    with pytest.raises(InputError, match="--as"):
        approve(ws, g["refs"]["adapter"], " ", "note")
    with pytest.raises(InputError, match="not an adapter"):
        approve(ws, g["refs"]["data"], "Bob", "note")
    with pytest.raises(InputError, match="does not evaluate"):
        _approve_other_report(ws, g)


def _approve_other_report(ws, g):
    """An eval report of another adapter cannot be the report approved for this one."""
    ws.ledger.add_artifact(
        "eval_report", ws.store.put_bytes(b"{}"), name="other-eval", metadata={"adapters": ["sha256:" + "1" * 64]}
    )
    approve(ws, g["refs"]["adapter"], "Bob", "note", report_ref="other-eval@1")


def test_cli_docs_approve_export_verify(audit_env, tmp_path, capsys):
    from finetrace.cli import main

    ws, g = audit_env
    w = ["--workspace", str(ws.root)]
    assert main([*w, "approve", g["refs"]["adapter"], "--as", "Grace Hopper", "--note", "re-checked"]) == 0
    assert "approval by Grace Hopper" in capsys.readouterr().out
    out = tmp_path / "docs"
    assert (
        main(
            [
                *w,
                "docs",
                g["refs"]["adapter"],
                "--intended-use",
                str(g["intended_use"]),
                "-o",
                str(out),
                "--format",
                "md",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "routing-lora-annex-iv@" in text
    assert "Grace Hopper approved report" in (out / "annex-iv" / "annex_iv.md").read_text()
    assert main([*w, "docs", g["refs"]["adapter"], "--format", "md"]) == 0
    assert "intended use not provided" in capsys.readouterr().err
    bundle = tmp_path / "b.zip"
    assert main([*w, "export", g["refs"]["adapter"], "-o", str(bundle)]) == 0
    assert main(["verify", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "verify: OK" in out and "checked 2 approvals" in out


def test_an_unevaluated_adapter_says_what_is_missing(audit_env):
    """Nothing is invented: with no evaluation, no approval and no gate, each place says what would provide it."""
    from finetrace.train import TrainConfig, train

    ws, g = audit_env
    old = ws.ledger.get_run(ws.ledger.artifact(g["digests"]["adapter"]).run_id)
    cfg = {k: v for k, v in old.config.items() if k != "resolved"}
    fresh = train(
        ws,
        TrainConfig.model_validate({**cfg, "output_name": "unevaluated", "init_from": g["refs"]["adapter"]}),
        progress=False,
    )
    generate_documents(ws, fresh.ref, intended_use=g["intended_use"], formats=("md",))
    docs = _docs(ws, fresh.digest)
    annex = docs["annex_iv"]["annex_iv.md"].decode()
    assert (
        f"*not provided* (would be provided by: an evaluation of this adapter (`finetrace eval --adapter {fresh.ref}`))"
        in annex
    )
    assert "*not provided* (would be provided by: a `gate.verdict` recorded by `finetrace eval`)" in annex
    assert f"*not provided* (would be provided by: `finetrace approve {fresh.ref} --as NAME --note TEXT`)" in annex
    assert f"continues training of {g['refs']['adapter']}" in annex  # lineage: the parent adapter
    card = docs["model_card"]["README.md"].decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert "model-index" not in meta  # no results are claimed
    assert f"Parent adapter: {g['refs']['adapter']}" in card
    stmt = json.loads(base64.b64decode(json.loads(docs["attestation"]["attestation.dsse.json"])["payload"]))
    deps = stmt["predicate"]["buildDefinition"]["resolvedDependencies"]
    assert {
        "name": "parent_adapter",
        "uri": f"finetrace:{g['refs']['adapter']}",
        "digest": {"sha256": g["digests"]["adapter"].split(":")[1]},
    } in deps


def _check_with_in_toto_attestation(stmt: dict) -> None:
    """The in-toto attestation framework's own protos: the Statement validates and the predicate parses
    strictly (unknown fields refused) as a SLSA Provenance v1 message. Skipped where not installed."""
    try:
        from google.protobuf import json_format
        from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
        from in_toto_attestation.v1 import resource_descriptor_pb2, statement_pb2
        from in_toto_attestation.v1.resource_descriptor import ResourceDescriptor
        from in_toto_attestation.v1.statement import Statement
    except ImportError:
        return
    Statement.copy_from_pb(json_format.ParseDict(stmt, statement_pb2.Statement())).validate()
    prov = json_format.ParseDict(stmt["predicate"], provenance_pb2.Provenance())
    assert prov.build_definition.build_type == "https://finetrace.dev/train/v1"
    for dep in stmt["predicate"]["buildDefinition"]["resolvedDependencies"]:
        ResourceDescriptor.copy_from_pb(
            json_format.ParseDict(dep, resource_descriptor_pb2.ResourceDescriptor())
        ).validate()


def test_annex_iv_describes_a_dpo_run_as_preference_optimisation(audit_env, tmp_path):
    import json

    from finetrace.audit import generate_documents
    from finetrace.data import import_dataset
    from finetrace.train import TrainConfig, train

    ws, g = audit_env
    rows = [{"prompt": f"Is clause {i} enforceable?", "chosen": "yes, as written", "rejected": "no"} for i in range(24)]
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    import_dataset(ws, [data], "prefs")
    art = train(
        ws,
        TrainConfig(
            base_model=g["refs"]["base"],
            dataset="prefs",
            objective="dpo",
            output_name="dpo-a",
            max_steps=2,
            batch_size=4,
            checkpoint_every=None,
            threads=1,
        ),
        progress=False,
    )
    generate_documents(ws, art.ref, intended_use=g["intended_use"], formats=("md",))
    md = _docs(ws, art.digest)["annex_iv"]["annex_iv.md"].decode()
    assert "direct preference optimisation" in md and "loss sigmoid, beta 0.1" in md
    assert "DPO preference loss on the dataset's (prompt, chosen, rejected) pairs" in md
    assert "supervised fine-tuning cross-entropy" not in md and "loss on the answer tokens only" not in md
