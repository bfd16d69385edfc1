"""One decoder: evaluation, the served API (official client, mixed-adapter batches) and `generate` give the
same tokens; a non-ChatML model stops at its own end of turn; parity catches a swapped adapter."""

from __future__ import annotations

import threading

import openai
import pytest

from finetrace.serve.engine import Engine
from finetrace.serve.server import BackgroundServer
from finetrace.serve.settings import ServeSettings

WORDS = ["contract", "supplier", "invoice", "data", "France", "billing", "audit", "river", "model", "train"]
PROMPTS = [f"{WORDS[i % 10]} {WORDS[(i * 3) % 10]} question {i}: what is {WORDS[(i * 7) % 10]}?" for i in range(50)]
MAX_NEW = 8


def _dataset(ws, tmp, name="parity-set"):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp / f"ds-{name}"
    folder.mkdir()
    rows = [{"prompt": p, "completion": "x"} for p in PROMPTS]
    (folder / "dataset.json").write_text(
        json.dumps({"schema": "completion", "columns": ["completion", "prompt"], "counts": {"test": len(rows)}})
    )
    pq.write_table(pa.Table.from_pylist(rows), folder / "test.parquet")
    return ws.ledger.add_artifact("dataset", ws.store.put_dir(folder), name=name)


def _suite(tmp):
    p = tmp / "parity-suite.yaml"
    p.write_text(
        f"bias: {{enabled: false}}\nforgetting: {{enabled: false}}\nbootstrap: {{samples: 10}}\n"
        f"max_new_tokens: {MAX_NEW}\nbatch_size: 8\n"
    )
    return p


@pytest.fixture(scope="module")
def evaluated(served_ws):
    """alpha@1 evaluated on 50 prompts: the report with its recorded answer tokens."""
    from finetrace.evaluate.runner import evaluate, load_report

    tmp = served_ws.ctx["tmp"]
    ds = _dataset(served_ws, tmp)
    art = evaluate(served_ws, "tiny", ds.ref, adapter_ref="alpha@1", suite=_suite(tmp), name="parity-eval")
    rep = load_report(served_ws, art.digest)
    return rep, next(s for s in rep["models"] if s.get("ref") == "alpha@1")


@pytest.mark.slow
def test_eval_served_and_generate_are_token_identical(served_ws, evaluated):
    from finetrace.models.generate import ChatStats, chat_messages, load_for_chat, stream_chat

    _, subject = evaluated
    want = subject["answer_tokens"]
    assert len(want) == 50 and len({tuple(t) for t in want}) >= 5  # answers vary
    settings = ServeSettings(max_batch=16)
    got: dict = {}
    with BackgroundServer(Engine(served_ws, "tiny", ["alpha@1", "beta@1"], settings), settings) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        jobs = [(m, i) for i in range(50) for m in ("alpha@1", "beta@1") if m == "alpha@1" or i % 3 == 0]
        barrier = threading.Barrier(sum(i < 10 for _, i in jobs))  # all in the first wave of 20

        def ask(model, i):
            if i < 10:
                barrier.wait()
            r = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": PROMPTS[i]}],
                max_tokens=MAX_NEW,
                temperature=0,
                extra_body={"return_token_ids": True},
            )
            got[(model, i)] = (r.choices[0].model_extra["token_ids"], r.choices[0].message.content)

        threads = [threading.Thread(target=ask, args=j) for j in jobs]
        for k in range(0, len(threads), 20):  # 20 concurrent: alpha and beta rows share the batches
            [t.start() for t in threads[k : k + 20]]
            [t.join() for t in threads[k : k + 20]]
    served = [got[("alpha@1", i)][0] for i in range(50)]
    assert served == want
    assert [got[("alpha@1", i)][1] for i in range(50)] == subject["answers"]
    assert sum(got[("beta@1", i)][0] != want[i] for i in range(0, 50, 3)) >= 5  # the other adapter differs
    model, tok, _ = load_for_chat(served_ws, "tiny", "alpha@1")
    for i in range(50):
        stats = ChatStats()
        text = "".join(stream_chat(model, tok, chat_messages(PROMPTS[i]), max_new_tokens=MAX_NEW, stats=stats))
        ids = stats.token_ids[:-1] if stats.finish_reason == "stop" else stats.token_ids
        assert ids == want[i], i
        assert text.strip() == subject["answers"][i]


@pytest.mark.slow
def test_parity_exact_then_swapped_adapter_blocks_deploy(served_ws, evaluated, capsys):
    from finetrace.pipeline.stages import parity_gate
    from finetrace.serve.parity import ParityRefused, latest_parity, parity

    from .serve_support import make_adapter

    res = parity(served_ws, "alpha@1")
    assert (res.n, res.agreeing, res.exact, res.differing) == (50, 50, True, [])
    run = served_ws.ledger.get_run(res.run_id)
    assert run.kind == "parity" and run.status == "succeeded" and run.metrics["agreement"] == 1.0
    assert latest_parity(served_ws, res.adapter)["agreement"] == 1.0
    from finetrace.audit import documents
    from finetrace.audit.facts import gather

    facts = gather(served_ws, "alpha@1")
    out = served_ws.ctx["tmp"] / "docs-parity"
    folders = documents.render_all(facts, out, formats=("md",))
    for doc in ("model_card", "annex_iv"):
        text = "\n".join(p.read_text() for p in folders[doc].glob("*.md"))
        assert "50/50 served answers equal the evaluated ones (token-exact, engine native" in text, doc
    from finetrace.serve.provenance import render, resolve

    eng = Engine(served_ws, "tiny", ["alpha@1"], ServeSettings())
    eng.start()
    try:
        pid = eng.generate("alpha@1", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=2).provenance_id
    finally:
        eng.stop()
    doc = resolve(served_ws, pid)
    assert doc["parity"]["exact"] and doc["parity"]["run_id"] == res.run_id
    assert any(line.startswith("parity      50/50") for line in render(doc))
    c = served_ws.ctx
    swapped = make_adapter(served_ws, c["base"], c["tokenizer"], c["model_dir"], "alpha", 77, c["tmp"])
    assert swapped.ref == "alpha@2"  # another adapter under the same name
    import json

    from finetrace.cli import main

    assert main(["--workspace", str(served_ws.root), "parity", "alpha@2", "--json"]) == 1  # below 1.0: exit 1
    bad = json.loads(capsys.readouterr().out)
    assert bad["evaluated_adapter"] != bad["adapter"] and bad["agreement"] < 0.8
    assert (
        len(bad["differing"]) == 50 - bad["agreeing"] and bad["differing"][0]["eval"] != bad["differing"][0]["served"]
    )
    with pytest.raises(ParityRefused, match="min_serve_agreement"):
        parity_gate(served_ws, "alpha@2", None, 1.0, print)
    assert parity_gate(served_ws, "alpha@1", None, 1.0, print).exact


@pytest.mark.slow  # uses alpha@2, made by the slow test above
def test_publish_is_refused_below_min_serve_agreement(served_ws, evaluated):
    """alpha@2 (swapped under the evaluated name) given the evaluated report's passing verdict: publishing
    it is refused by parity; alpha@1, the adapter evaluated, passes the same gate."""
    from finetrace.ledger.clearance import record_verdict
    from finetrace.market.client import build_package
    from finetrace.serve.parity import ParityRefused, latest_parity, publish_gate

    one = served_ws.ledger.resolve("alpha@1", kind="adapter")
    two = served_ws.ledger.resolve("alpha@2", kind="adapter")  # made by the test above
    report = served_ws.ledger.resolve("parity-eval", kind="eval_report").digest
    record_verdict(
        served_ws.ledger,
        two.digest,
        report,
        True,
        [{"name": "accuracy", "value": 1.0, "threshold": 0.0, "op": ">=", "passed": True}],
    )
    with pytest.raises(ParityRefused, match="min_serve_agreement 1"):
        build_package(served_ws, "alpha@2", "acme/alpha@1.0.0", min_serve_agreement=1.0)
    assert latest_parity(served_ws, two.digest)["agreement"] < 0.8
    assert publish_gate(served_ws, one.digest, report)["exact"]
    assert publish_gate(served_ws, two.digest, report, min_agreement=0.0)["agreement"] < 0.8  # an explicit floor
