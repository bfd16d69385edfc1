"""DPO: log 2 at step 0, chunked/packed == textbook full logits, accumulation, learning, errors, resume (two
processes under torchrun: test_torchrun.py)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from finetrace.errors import ConfigError
from finetrace.train import load_config, train
from finetrace.train import preference as P
from finetrace.train.adapters import load_base
from finetrace.train.attention import segments
from finetrace.train.config import DpoParams

from .train_support import make_config

WORDS = [
    "fox",
    "dog",
    "contract",
    "invoice",
    "data",
    "model",
    "train",
    "serve",
    "goods",
    "party",
    "audit",
    "world",
    "customer",
    "supplier",
    "clause",
    "capital",
]


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable preference task: whatever the question, 'yes' is preferred to 'no'."""
    rng, rows, seen = random.Random(seed), [], set()
    while len(rows) < n:
        prompt = "Is the " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))) + " ready?"
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "chosen": "yes", "rejected": "no"})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def prefs(tiny_setup, tmp_path):
    """The tiny-model workspace with a preference dataset 'prefs' imported by the real data stage."""
    from finetrace.data import import_dataset

    ws, _, _ = tiny_setup
    art = import_dataset(
        ws, [write_jsonl(tmp_path / "prefs.jsonl", preference_rows(48))], "prefs", splits=(0.8, 0.2, 0.0)
    )
    assert art.metadata["schema"] == "preference" and art.metadata["counts"]["validation"] > 0
    return ws


def dpo_config(**kw):
    base = dict(dataset="prefs", objective="dpo", output_name="prefs-dpo", eps=1e-3, threads=1)
    base.update(kw)
    return make_config(**base)


def history(ws, art) -> list[dict]:
    return [json.loads(line) for line in (ws.store.materialize(art.digest) / "metrics.jsonl").read_text().splitlines()]


def tensors(ws, art):
    return load_file(ws.store.materialize(art.digest) / "adapter_model.safetensors")


# -- 1. policy == reference at step 0 -----------------------------------------------------------------
@pytest.mark.slow
def test_step_zero_loss_is_log2_for_fresh_and_continued_adapters(prefs, learnable_model_dir, tmp_path):
    from peft import PeftModel

    from finetrace.data import import_dataset, read_split

    ws = prefs
    art = train(ws, dpo_config(max_steps=1), progress=False)
    first = history(ws, art)[0]
    assert abs(first["loss"] - math.log(2)) < 1e-6, first
    assert abs(first["reward_margin"]) < 1e-5 and abs(first["reward_chosen"]) < 1e-5
    for method in ("dora", "full"):  # the reference is the policy at the start whatever the method
        other = train(ws, dpo_config(max_steps=1, method=method, output_name=f"dpo-{method}"), progress=False)
        assert abs(history(ws, other)[0]["loss"] - math.log(2)) < 1e-6, method
    # continuing an adapter (here one taught the *rejected* answers by SFT): the reference is the parent
    sft = import_dataset(
        ws,
        [write_jsonl(tmp_path / "no.jsonl", preference_rows(48))],
        "say-no",
        schema="completion",
        mapping=["completion=rejected"],
        splits=(1, 0, 0),
    )
    train(ws, make_config(dataset=sft.ref, max_steps=10, lr=1e-2, output_name="sft-parent", threads=1), progress=False)
    child = train(ws, dpo_config(max_steps=1, init_from="sft-parent@1", output_name="dpo-child"), progress=False)
    assert abs(history(ws, child)[0]["loss"] - math.log(2)) < 1e-6
    # ... not the base: scored against the base, the parent's policy is far from log 2
    base_model, tok = load_base(learnable_model_dir)
    parent = PeftModel.from_pretrained(base_model, str(ws.store.materialize(ws.ledger.resolve("sft-parent@1").digest)))
    pairs, _ = P.encode_pairs(tok, read_split(ws, "prefs", "train").to_pylist()[:8], 256)
    batch, seq = P.collate_pairs(pairs, True, 0)
    with torch.no_grad(), segments(batch.cu_seqlens):
        tuned = P.sequence_logps(parent.eval(), batch, seq, 16).view(-1, 2)
        with parent.disable_adapter():
            base = P.sequence_logps(parent, batch, seq, 16).view(-1, 2)
    against_base, _, _ = P.pair_losses(tuned, base, torch.ones(8, 2), DpoParams())
    assert float(against_base.mean()) > math.log(2) + 0.1
    facts = json.loads((ws.store.materialize(child.digest) / "finetrace_adapter.json").read_text())
    assert facts["objective"] == "dpo" and facts["parent"] == ws.ledger.resolve("sft-parent@1").digest
    assert facts["config"]["dpo"] == {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "sft_weight": 0.0}


# -- 2. chunked + packed == textbook ------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    torch.manual_seed(0)
    model, tok = load_base(tiny_model_dir)  # every weight trains, the tied output layer included
    model.train()
    return model, tok


def textbook(model, tok, pairs, ref, params):
    """Full logits, F.log_softmax and a plain padded batch; the loss formulas as in the papers."""
    seqs = [s for p in pairs for s in (p.chosen, p.rejected)]
    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    target_mask = torch.zeros((len(seqs), width - 1))
    for b, s in enumerate(seqs):
        ids[b, : len(s.ids)] = torch.tensor(s.ids)
        mask[b, : len(s.ids)] = 1
        target_mask[b, s.n_prompt - 1 : len(s.ids) - 1] = 1  # positions predicting target tokens and eos
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (2P, T, V)
    logp = torch.nn.functional.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)
    seq_logp = (logp * target_mask).sum(1).view(-1, 2)  # (P, 2) [chosen, rejected]
    n_tok = target_mask.sum(1).view(-1, 2)
    pol, rf = (seq_logp / n_tok, ref / n_tok) if params.loss_type == "ipo" else (seq_logp, ref)
    z = (pol[:, 0] - rf[:, 0]) - (pol[:, 1] - rf[:, 1])
    b, s = params.beta, params.label_smoothing
    if params.loss_type == "sigmoid":
        losses = -(1 - s) * torch.log(torch.sigmoid(b * z)) - s * torch.log(torch.sigmoid(-b * z))
    elif params.loss_type == "ipo":
        losses = (z - 1 / (2 * b)) ** 2
    else:
        losses = torch.clamp(1 - b * z, min=0)
    loss = losses.mean()
    if params.sft_weight:
        loss = loss + params.sft_weight * -seq_logp[:, 0].sum() / n_tok[:, 0].sum()
    return loss


@pytest.mark.slow
@pytest.mark.parametrize(
    "params",
    [
        DpoParams(),
        DpoParams(beta=0.5, label_smoothing=0.2, sft_weight=0.5),
        DpoParams(loss_type="ipo", beta=0.3),
        DpoParams(loss_type="hinge", beta=0.2),
    ],
    ids=["sigmoid", "cdpo-rpo", "ipo", "hinge"],
)
def test_chunked_packed_loss_and_gradients_equal_textbook(model_tok, params):
    model, tok = model_tok
    rows = [
        {"prompt": "Is the fox ready?", "chosen": "yes", "rejected": "no"},
        {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "The quick brown dog"},
        {"prompt": "Label: positive negative neutral. The contract", "chosen": "neutral", "rejected": "yes no"},
    ]
    pairs, skipped = P.encode_pairs(tok, rows, max_length=256)
    c, r = pairs[0].chosen, pairs[0].rejected
    assert skipped == 0 and c.n_prompt == r.n_prompt and c.ids[: c.n_prompt] == r.ids[: r.n_prompt]  # shared prompt
    with torch.no_grad():  # a reference away from the policy, so the loss is not at its symmetric point
        batch, seq = P.collate_pairs(pairs, True, tok.pad_token_id)
        ref = P.sequence_logps(model, batch, seq, 6).view(-1, 2) + torch.tensor([[0.7, -0.4], [-1.1, 0.3], [0.2, 1.5]])
    params_list = [p for p in model.parameters()]
    model.zero_grad()
    stats = P.new_stats()
    n_chosen = sum(p.chosen.n_target for p in pairs)
    vocab, head_rows, linear = model.config.vocab_size, [], torch.nn.functional.linear

    def watched(x, w, b=None):  # records the rows of every output-layer product, forward and backward
        if w.shape[0] == vocab:
            head_rows.append(x.reshape(-1, x.shape[-1]).shape[0])
        return linear(x, w, b)

    torch.nn.functional.linear = watched
    try:
        got = P.micro_batch(model, pairs, ref, params, len(pairs), n_chosen, True, tok.pad_token_id, 7, stats)
    finally:
        torch.nn.functional.linear = linear
    n_targets = sum(p.n_target for p in pairs)
    assert max(head_rows) == 7 and sum(head_rows) == 2 * n_targets  # chunks of 7, once forward, once backward
    g1 = [p.grad.clone() for p in params_list]
    model.zero_grad()
    want = textbook(model, tok, pairs, ref, params)
    want.backward()
    g2 = [p.grad.clone() for p in params_list]
    model.zero_grad()
    want_value = float(want.detach())
    assert abs(got - want_value) < 1e-5 * max(1.0, abs(want_value)), (got, want_value)
    assert max(float(g.abs().max()) for g in g2) > 1e-3  # the gradients are not trivially zero
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the same pairs in a padded batch (packing off) give the same sequence log-probabilities
    with torch.no_grad():
        padded, pseq = P.collate_pairs(pairs, False, tok.pad_token_id)
        torch.testing.assert_close(
            P.sequence_logps(model, padded, pseq, 6, chunk=5).view(-1, 2),
            P.sequence_logps(model, batch, seq, 6).view(-1, 2),
            rtol=1e-5,
            atol=1e-5,
        )


def test_token_logprobs_function_passes_gradcheck_with_a_bias():
    torch.manual_seed(0)
    h = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 6, 3, 1])
    # chunk 2 over 5 rows: a partial last chunk; float32 inside, as for real models, hence the tolerances
    assert torch.autograd.gradcheck(
        lambda h, w, b: P.TokenLogProbs.apply(h, w, b, y, 2), (h, w, b), eps=1e-3, atol=1e-3, rtol=1e-3
    )
    want = torch.log_softmax(h @ w.t() + b, dim=-1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(P.TokenLogProbs.apply(h, w, b, y, 2).double(), want, rtol=1e-5, atol=1e-5)


# -- 3. accumulation ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_batch_8_equals_batch_4_with_accumulation_2(prefs):
    ws = prefs
    kw = dict(max_steps=3, lr=1e-2, eval_every=3)
    a = train(ws, dpo_config(batch_size=8, grad_accum=1, output_name="b8", **kw), progress=False)
    b = train(
        ws,
        dpo_config(batch_size=4, grad_accum=2, gradient_checkpointing=True, output_name="b4x2", **kw),
        progress=False,
    )
    c = train(ws, dpo_config(batch_size=8, micro_batch_tokens=100, output_name="b8t", **kw), progress=False)
    ta = tensors(ws, a)
    for other in (b, c):
        for k, v in tensors(ws, other).items():
            torch.testing.assert_close(v, ta[k], rtol=0, atol=1e-5)
    ha, hb = history(ws, a), history(ws, b)
    for ra, rb in zip(ha, hb):
        for key in ("loss", "reward_accuracy", "reward_margin", "val_loss"):
            if key in ra:
                assert abs(ra[key] - rb[key]) < 1e-5, (key, ra, rb)
    assert abs(ha[0]["loss"] - math.log(2)) < 1e-6 and ha[-2]["loss"] < ha[0]["loss"]


# -- 4. learning --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dpo_learns_the_preference_and_the_adapter_loads_with_peft(prefs, learnable_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ws = prefs
    art = train(ws, dpo_config(max_steps=20, lr=1e-2, schedule="constant", eval_every=10), progress=False)
    hist = history(ws, art)
    steps = [r for r in hist if "loss" in r]
    vals = [r for r in hist if "val_loss" in r]
    assert len(steps) == 20 and len(vals) == 2
    assert set(steps[0]) >= {"loss", "reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected"}
    assert steps[-1]["reward_accuracy"] >= 0.9 and vals[-1]["val_reward_accuracy"] >= 0.9, (steps[-1], vals[-1])
    assert steps[0]["reward_margin"] < 1e-5 < steps[1]["reward_margin"] < steps[-1]["reward_margin"] - 0.5
    assert steps[-1]["loss"] < 0.5 * math.log(2) and vals[-1]["val_loss"] < 0.5 * math.log(2)
    assert steps[-1]["reward_chosen"] > steps[-1]["reward_rejected"]
    run = ws.ledger.get_run(art.run_id)
    m = run.metrics
    assert m["final_reward_accuracy"] == steps[-1]["reward_accuracy"] and m["val_reward_accuracy"] >= 0.9
    assert m["pairs"] == 38 and m["examples"] == 38 and m["reference_pass_s"] >= 0
    assert run.config["objective"] == "dpo" and run.config["dpo"]["beta"] == 0.1

    folder = ws.store.materialize(art.digest)
    tok = AutoTokenizer.from_pretrained(learnable_model_dir)
    base = AutoModelForCausalLM.from_pretrained(learnable_model_dir, dtype=torch.float32)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Is the serve clause ready?"}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    yes, no = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("yes", "no"))
    with torch.no_grad():
        before = base(ids).logits[0, -1]
        after = PeftModel.from_pretrained(base, str(folder)).eval()(ids).logits[0, -1]
    assert after[yes] - after[no] > before[yes] - before[no] + 1.0  # the tuned model prefers the chosen answer


# -- 5. errors ----------------------------------------------------------------------------------------
def test_objective_and_dataset_must_match(prefs, tmp_path):
    from finetrace.data import import_dataset

    ws = prefs
    with pytest.raises(ConfigError, match="field 'objective'.*needs a preference dataset.*completion"):
        train(ws, make_config(objective="dpo"), progress=False)  # toy is a completion dataset
    with pytest.raises(ConfigError, match="field 'objective'.*objective: dpo") as err:
        train(ws, make_config(dataset="prefs"), progress=False)
    assert "--map completion=chosen" in str(err.value)
    assert ws.ledger.runs("train") == []  # refused before a run is recorded
    # the hint works: the same file imported as a completion dataset trains SFT on the chosen answers
    art = import_dataset(
        ws,
        [write_jsonl(tmp_path / "p.jsonl", preference_rows(12))],
        "prefs-sft",
        schema="completion",
        mapping=["completion=chosen"],
        splits=(1, 0, 0),
    )
    # compile off: the quick set compiles no kernels (test_kernels.py does, marked slow)
    cfg = make_config(dataset=art.ref, max_steps=1, threads=1, compile=False)
    assert train(ws, cfg, progress=False).kind == "adapter"


def test_dpo_config_keys_are_checked(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("base_model: tiny\ndataset: prefs\noutput_name: d\nobjective: dpo\ndpo:\n  beta: 0.2\n")
    cfg = load_config(f, ["dpo.loss_type=hinge"])
    assert (cfg.objective, cfg.dpo.beta, cfg.dpo.loss_type) == ("dpo", 0.2, "hinge")
    with pytest.raises(ConfigError, match="field 'dpo.betta'.*did you mean 'dpo.beta'"):
        load_config(f, ["dpo.betta=1"])
    with pytest.raises(ConfigError, match="field 'dpo'.*label_smoothing applies to loss_type sigmoid only"):
        load_config(f, ["dpo.loss_type=ipo", "dpo.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="field 'objective'"):
        load_config(f, ["objective=ppo"])


# -- 6. resume ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_after_a_crash_equals_uninterrupted(prefs, monkeypatch):
    ws = prefs
    cfg = dpo_config(
        max_steps=7,
        lr=1e-2,
        lora={"r": 8, "dropout": 0.1},
        eval_every=3,
        early_stopping_patience=50,
        checkpoint_every=2,
        output_name="resumable",
    )
    real, calls = P.micro_batch, []

    def crash_in_step_6(*args, **kw):
        calls.append(1)
        if len(calls) == 6:  # batch 4, grad_accum 1: one micro-batch per step
            raise RuntimeError("power cut")
        return real(*args, **kw)

    monkeypatch.setattr(P, "micro_batch", crash_in_step_6)
    with pytest.raises(RuntimeError, match="power cut"):
        train(ws, cfg, progress=False)
    monkeypatch.setattr(P, "micro_batch", real)
    resumed = train(ws, cfg, resume=True, progress=False)
    assert ws.ledger.get_run(resumed.run_id).metrics["resumed_from_step"] == 4
    fresh = train(ws, cfg, progress=False)
    a, b = tensors(ws, resumed), tensors(ws, fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert history(ws, resumed) == history(ws, fresh)  # losses, rewards, validation at every step


def test_cli_shows_reward_accuracy(prefs, tmp_path, capsys):
    from finetrace.cli import main

    ws = prefs
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(
        "base_model: tiny\ndataset: prefs\nobjective: dpo\noutput_name: cli-dpo\nmax_steps: 2\n"
        "batch_size: 4\nthreads: 1\ncompile: false\n"  # the quick set compiles no kernels
    )
    assert main(["-w", str(ws.root), "train", str(cfg), "--set", "dpo.beta=0.2"]) == 0
    captured = capsys.readouterr()
    assert "adapter cli-dpo@1" in captured.out and "acc " in captured.err  # the progress bar
    run = ws.ledger.runs("train")[-1]
    assert run.config["dpo"]["beta"] == 0.2 and 0 <= run.metrics["final_reward_accuracy"] <= 1
