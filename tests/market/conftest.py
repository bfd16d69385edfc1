"""Fixtures for the marketplace: a publisher workspace (tiny base, a LoRA adapter with an eval report, a
passed gate and documents), a buyer workspace with the same base, and a real registry server on a free
port, once per database: SQLite always, PostgreSQL when ``FINETRACE_TEST_PG_URL`` is set."""

from __future__ import annotations

import json
import os

import pytest

PG_URL = os.environ.get("FINETRACE_TEST_PG_URL")


def make_adapter(ws, base_art, tokenizer, base_dir, tmp_path, name="legal-lora", seed=1, r=4, **lora_kw):
    """Train-like: a PEFT LoRA adapter with random non-zero B, recorded by a `train` run."""
    from finetrace.models.identity import text_identity
    from finetrace.models.tiny import random_lora

    out = random_lora(base_dir, tmp_path / f"adapter-{name}-{seed}", seed, r=r, **lora_kw)
    ident = text_identity(tokenizer)
    (out / "finetrace_adapter.json").write_text(
        json.dumps({"format": "finetrace-adapter/1", "base_model": base_art.digest, "method": "lora", "r": r, **ident})
    )
    ds = tmp_path / f"dataset-{name}-{seed}"
    ds.mkdir()
    (ds / "dataset.json").write_text(json.dumps({"schema": "classification", "counts": {"train": 3}}))
    data = ws.ledger.add_artifact("dataset", ws.store.put_dir(ds), name=f"{name}-data")
    meta = {"base_model": base_art.digest, "method": "lora", "r": r, "target_modules": ["q_proj", "v_proj"], **ident}
    with ws.ledger.run(
        "train", config={"method": "lora", "r": r, "seed": seed}, inputs=[base_art.digest, data.digest], seed=seed
    ) as run:
        art = run.output("adapter", ws.store.put_dir(out), name=name, metadata=meta)
    ws.checkpoint()
    return art


def add_evidence(ws, art, tmp_path, accuracy=0.93, passed=True, docs=("model_card", "annex_iv", "ab2013")):
    """An eval report (report.json in the evaluate format), a gate verdict and document artifacts."""
    from finetrace.ledger.clearance import record_verdict

    rep = tmp_path / f"report-{art.digest[7:19]}"
    rep.mkdir()
    (rep / "report.json").write_text(
        json.dumps(
            {
                "format": "finetrace-eval-report/1",
                "primary_metric": "accuracy",
                "metrics": ["accuracy", "macro_f1"],
                "run_id": "evaluate-20261201T090000-000000",
                "suite": {"name": "legal"},
                "base_model": {"digest": (art.metadata or {}).get("base_model", "sha256:" + "0" * 64), "ref": "tiny@1"},
                "dataset": {"ref": "legal-test@1", "digest": "sha256:" + "1" * 64, "split": "test", "n": 100},
                "models": [
                    {
                        "ref": "tiny@1",
                        "adapter": None,
                        "metrics": {"accuracy": {"value": 0.41}, "macro_f1": {"value": 0.3}},
                    },
                    {
                        "ref": art.ref,
                        "adapter": art.digest,
                        "metrics": {"accuracy": {"value": accuracy}, "macro_f1": {"value": accuracy - 0.05}},
                        "bias": {"categories": {"gender": {"flip_rate": 0.02, "gap": 0.01}}},
                    },
                ],
            }
        )
    )
    (rep / "report.html").write_text("<html><body><h1>Evaluation report</h1></body></html>")
    with ws.ledger.run("evaluate", config={"adapter": art.digest}, inputs=[art.digest]) as run:
        report = run.output("eval_report", ws.store.put_dir(rep), name="eval-legal")
    record_verdict(
        ws.ledger,
        art.digest,
        report.digest,
        passed,
        [{"name": "accuracy", "value": accuracy, "threshold": 0.8, "op": ">=", "passed": passed}],
    )
    texts = {
        "model_card": "# Legal contract classifier\n\nClassifies contract clauses: termination, liability.\n",
        "annex_iv": "# Annex IV technical documentation\n",
        "ab2013": "# AB 2013 training data disclosure\n",
    }
    for kind in docs:
        f = tmp_path / f"{kind}-{art.digest[7:19]}.md"
        f.write_text(texts[kind] + f"\nAdapter {art.ref} ({art.digest})\n")
        ws.ledger.add_artifact("document", ws.store.put_file(f), metadata={"adapter": art.digest, "document": kind})
    ws.checkpoint()
    return report


@pytest.fixture(scope="module")
def market(tmp_path_factory, tiny_model_dir):
    """Publisher and buyer workspaces with the tiny base; the publisher's `legal-lora` is evaluated and documented."""
    from transformers import AutoTokenizer

    from finetrace.models import add_folder
    from finetrace.workspace import Workspace

    tmp = tmp_path_factory.mktemp("market")
    pub = Workspace.init(tmp / "publisher")
    base = add_folder(pub, tiny_model_dir, "tiny")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    art = make_adapter(pub, base, tok, tiny_model_dir, tmp)
    add_evidence(pub, art, tmp)
    buyer = Workspace.init(tmp / "buyer")
    add_folder(buyer, tiny_model_dir, "tiny")

    class M:
        pass

    m = M()
    m.pub, m.buyer, m.base, m.adapter, m.tok, m.tmp, m.model_dir = pub, buyer, base, art, tok, tmp, tiny_model_dir
    yield m
    pub.close()
    buyer.close()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    """A real registry under uvicorn on a free 127.0.0.1 port, with accounts `acme` and `mallory`."""
    from finetrace.market.registry import Settings
    from finetrace.market.server import BackgroundServer

    tmp = tmp_path_factory.mktemp(f"registry-{request.param}")
    if request.param == "postgresql":
        if not PG_URL:
            pytest.skip("FINETRACE_TEST_PG_URL is not set (scripts/start_postgres.sh prints one)")
        from finetrace.market.db import create_database

        url = create_database(PG_URL, "ft_market_")
    else:
        url = f"sqlite:///{tmp / 'registry.db'}"
    settings = Settings(db_url=url, store=str(tmp / "store"))
    with BackgroundServer(settings) as srv:
        srv.tokens = {"acme": srv.registry.add_user("acme"), "mallory": srv.registry.add_user("mallory")}
        srv.kind = request.param
        yield srv
    srv.registry.close()
