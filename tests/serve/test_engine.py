"""The engine in-process: mixed-adapter batches equal independent single-model generation; adapter checks."""

from __future__ import annotations

import threading

import pytest

from finetrace.decoding.text import holdback as _holdback
from finetrace.ledger.clearance import record_override, record_verdict
from finetrace.serve.engine import Engine
from finetrace.serve.registry import DeploymentRefused
from finetrace.serve.request import QueueFull
from finetrace.serve.settings import ServeSettings

PROMPTS = [
    "The supplier shall deliver the goods",
    "Question: What is the capital of France?",
    "hello",
    "Personal data must be processed lawfully, fairly and in a transparent manner.",
]


@pytest.fixture(scope="module")
def engine(served_ws):
    eng = Engine(served_ws, "tiny", ["alpha@1", "beta@1"], ServeSettings(max_batch=8))
    eng.start()
    yield eng
    eng.stop()


def reference(ws, adapter: str | None, prompt: str, n: int) -> str:
    """Greedy text from an independent transformers(+PEFT) model with only this adapter, via generate()."""
    import torch
    from peft import PeftModel

    from finetrace.models import load_model

    model, tok, _ = load_model(ws, "tiny")
    if adapter:
        model = PeftModel.from_pretrained(model, str(ws.store.materialize(ws.ledger.resolve(adapter).digest)))
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_mixed_burst_equals_each_model_alone(served_ws, engine):
    jobs = [(m, p) for m in ("tiny", "alpha@1", "beta@1") for p in PROMPTS]
    results: dict = {}
    barrier = threading.Barrier(len(jobs))

    def run(m, p):
        barrier.wait()
        results[(m, p)] = engine.generate(m, prompt=p, max_tokens=10).text

    threads = [threading.Thread(target=run, args=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for m, adapter in (("tiny", None), ("alpha@1", "alpha@1"), ("beta@1", "beta@1")):
        for p in PROMPTS[:2]:
            assert results[(m, p)] == reference(served_ws, adapter, p, 10), (m, p)
    # adapters really change the answers, and served alone equals served in the burst
    assert len({results[(m, PROMPTS[0])] for m in ("tiny", "alpha@1", "beta@1")}) == 3
    for m, p in jobs[::3]:
        assert engine.generate(m, prompt=p, max_tokens=10).text == results[(m, p)]


def test_resolve_names_and_digests(served_ws, engine):
    alpha = served_ws.ledger.resolve("alpha@1")
    assert engine.resolve_model("alpha")[0] == "alpha@1"
    assert engine.resolve_model(alpha.digest)[0] == "alpha@1"
    assert engine.resolve_model(alpha.digest.split(":")[1][:12])[0] == "alpha@1"
    assert engine.resolve_model("tiny")[1] == "__base__"
    assert [m["id"] for m in engine.models()] == ["tiny", "alpha@1", "beta@1"]


def test_seeded_sampling_and_stop(engine):
    a = engine.generate("alpha@1", prompt="hello", max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    b = engine.generate("alpha@1", prompt="hello", max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    c = engine.generate("alpha@1", prompt="hello", max_tokens=12, temperature=1.5, seed=8)
    assert a.text == b.text and a.completion_tokens == 12
    assert c.text != a.text
    full = engine.generate("tiny", prompt=PROMPTS[1], max_tokens=12).text
    stop = full[3:6]
    cut = engine.generate("tiny", prompt=PROMPTS[1], max_tokens=12, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full[: full.find(stop)]


def test_holdback():
    assert _holdback("abc</", ["</s>"]) == 2
    assert _holdback("abc", ["</s>"]) == 0
    assert _holdback("ab\ufffd", []) == 1


def test_request_log_records_every_request(served_ws, engine):
    engine.request_log.flush()
    before = sum(1 for _ in served_ws.ledger.entries(type="serve.request"))
    res = [engine.generate("beta@1", prompt=p, max_tokens=3) for p in PROMPTS]
    engine.request_log.flush()
    events = [e.data for e in served_ws.ledger.entries(type="serve.request")]
    assert len(events) == before + len(PROMPTS)
    ev = next(e for e in events if e["provenance_id"] == res[0].provenance_id)
    assert ev["adapter"] == served_ws.ledger.resolve("beta@1").digest
    assert ev["deployment"] == engine.deployment and ev["completion_tokens"] == 3
    assert "content" not in ev  # only with --log-content
    import hashlib

    assert ev["output_sha256"] == "sha256:" + hashlib.sha256(res[0].text.encode()).hexdigest()


def test_hot_load_and_unload(served_ws, engine):
    from .serve_support import make_adapter

    c = served_ws.ctx
    make_adapter(served_ws, c["base"], c["tokenizer"], c["model_dir"], "gamma", 3, c["tmp"])
    info = engine.load_adapter("gamma@1")
    assert engine.generate("gamma@1", prompt="hello", max_tokens=4).completion_tokens == 4
    loaded = [e.data for e in served_ws.ledger.entries(type="deploy.adapter_loaded")]
    assert {"run_id": engine.deployment, "adapter": info.digest, "ref": "gamma@1"} in loaded
    assert engine.unload_adapter("gamma") == "gamma@1"
    with pytest.raises(Exception, match="does not exist"):
        engine.generate("gamma@1", prompt="hello", max_tokens=4)


def test_refusals(served_ws, tmp_path):
    from finetrace.models import add_folder
    from finetrace.models.tiny import build_tiny_model

    from .serve_support import make_adapter

    c = served_ws.ctx
    eng = Engine(served_ws, "tiny", [], ServeSettings())
    # wrong base: an adapter trained on another base
    other_dir = build_tiny_model(tmp_path / "other", seed=5)
    other = add_folder(served_ws, other_dir, "other")
    make_adapter(served_ws, other, c["tokenizer"], other_dir, "foreign", 4, tmp_path)
    with pytest.raises(DeploymentRefused, match="trained on base"):
        eng.load_adapter("foreign@1")
    # same base digest but a different chat template recorded
    make_adapter(
        served_ws,
        c["base"],
        c["tokenizer"],
        c["model_dir"],
        "oddtemplate",
        5,
        tmp_path,
        metadata={"chat_template_sha256": "sha256:" + "0" * 64},
    )
    with pytest.raises(DeploymentRefused, match="chat_template_sha256"):
        eng.load_adapter("oddtemplate@1")
    # failed gates: refused until an override is recorded
    art = make_adapter(served_ws, c["base"], c["tokenizer"], c["model_dir"], "gated", 6, tmp_path)
    record_verdict(
        served_ws.ledger,
        art.digest,
        None,
        False,
        [{"name": "accuracy", "value": 0.2, "threshold": 0.5, "op": ">=", "passed": False}],
    )
    with pytest.raises(DeploymentRefused, match="accuracy"):
        eng.load_adapter("gated@1")
    record_override(served_ws.ledger, art.digest, by="Ada Lovelace", reason="accepted for pilot")
    assert eng.load_adapter("gated@1").clearance.status == "overridden"
    # unevaluated: served by default, refused with require_eval
    strict = Engine(served_ws, "tiny", [], ServeSettings(require_eval=True))
    with pytest.raises(DeploymentRefused, match="require-eval"):
        strict.load_adapter("alpha@1")


def test_queue_full_raises(served_ws):
    eng = Engine(served_ws, "tiny", [], ServeSettings(max_queue=1, max_batch=1))
    eng._thread = threading.Thread()  # pretend started, but never consume: the queue must bound memory
    from finetrace.serve.request import GenRequest

    eng.submit(GenRequest([1, 2], "tiny", 4))
    with pytest.raises(QueueFull):
        eng.submit(GenRequest([1, 2], "tiny", 4))
    assert eng.metrics.rejected == 1


def test_gathered_kernel_equals_peft_mixed_batches(served_ws):
    """Own gathered LoRA (stacked, zero-padded ranks) == PEFT's per-adapter mixed batches, greedy."""
    from .serve_support import make_adapter

    c = served_ws.ctx
    make_adapter(served_ws, c["base"], c["tokenizer"], c["model_dir"], "wide", 9, c["tmp"], r=8)
    models = ["tiny", "alpha@1", "beta@1", "wide@1"]
    texts = {}
    for kernel in ("gathered", "peft"):
        eng = Engine(served_ws, "tiny", models[1:], ServeSettings(lora_kernel=kernel, max_batch=16))
        assert (type(eng.decoder.adapters).__name__ == "GatheredLoRA") == (kernel == "gathered")
        eng.start()
        try:
            out: dict = {}
            threads = [
                threading.Thread(
                    target=lambda m=m, p=p, eng=eng, out=out: out.__setitem__(
                        (m, p),
                        eng.generate(m, prompt=p, max_tokens=8).text,
                    )
                )
                for m in models
                for p in PROMPTS
            ]
            [t.start() for t in threads]
            [t.join() for t in threads]
            texts[kernel] = out
        finally:
            eng.stop()
    assert texts["gathered"] == texts["peft"]
    assert len({texts["gathered"][(m, PROMPTS[0])] for m in models}) == 4


def test_unloaded_while_queued_is_not_served_by_the_base(served_ws):
    """A request that waited while its adapter was unloaded fails; it is never answered by the base."""
    from finetrace.errors import NotFoundError
    from finetrace.serve.request import GenRequest

    eng = Engine(served_ws, "tiny", ["alpha@1"], ServeSettings())
    events = []
    req = GenRequest(eng.encode_text("hello"), "alpha@1", 4, 0.0, on_event=lambda k, v: events.append((k, v)))
    eng._thread = threading.Thread()  # accept without consuming, like a busy scheduler
    eng.submit(req)
    eng._thread = None
    eng.unload_adapter("alpha@1")
    eng._step()
    assert events and events[-1][0] == "error" and isinstance(events[-1][1], NotFoundError)


def test_extra_adapter_costs_about_its_size(served_ws):
    """PEFT's LoRA weights share storage with the gathered stacks: one copy per adapter, not two."""
    eng = Engine(served_ws, "tiny", ["alpha@1", "beta@1"], ServeSettings())
    storages = {}
    for n, p in eng.model.named_parameters():
        if "lora_" in n:
            storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    for m in eng.decoder.adapters.modules:
        for t in (m._ft_A, m._ft_B):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    lora_bytes = sum(p.numel() * p.element_size() for n, p in eng.model.named_parameters() if "lora_" in n)
    stack_bytes = sum(m._ft_A.nbytes + m._ft_B.nbytes for m in eng.decoder.adapters.modules)
    assert sum(storages.values()) == stack_bytes  # the PEFT weights add nothing
    assert stack_bytes == lora_bytes * 3 // 2  # 2 adapters of equal rank + the zero slot for the base
    eng.decoder.lean()  # the first forward settles the weights: the adapters' fp16 copies too
    half = sum(m._ft_A16.nbytes + m._ft_B16.nbytes for m in eng.decoder.adapters.modules)
    assert half == stack_bytes // 2


def test_log_content_keeps_full_text_only_when_asked(served_ws):
    eng = Engine(served_ws, "tiny", [], ServeSettings(log_content=True))
    eng.start()
    try:
        res = eng.generate("tiny", messages=[{"role": "user", "content": "secret question"}], max_tokens=3)
    finally:
        eng.stop()
    ev = next(
        e.data for e in served_ws.ledger.entries(type="serve.request") if e.data["provenance_id"] == res.provenance_id
    )
    assert ev["content"] == {"input": [{"role": "user", "content": "secret question"}], "output": res.text}
