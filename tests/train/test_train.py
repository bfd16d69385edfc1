"""End-to-end training on the tiny model: learning, the adapter artifact, equivalences, reproducibility."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from finetrace.errors import ConfigError
from finetrace.train import train

from .train_support import make_config

ADAPTER_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "finetrace_adapter.json",
    "metrics.jsonl",
    "loss_curve.png",
}


def adapter_tensors(ws, art):
    return load_file(ws.store.materialize(art.digest) / "adapter_model.safetensors")


@pytest.mark.slow
def test_loss_falls_and_adapter_is_recorded(tiny_setup):
    ws, base, ds = tiny_setup
    art = train(
        ws, make_config(dataset="routing", max_steps=40, lr=1e-2, eval_every=10, schedule="constant"), progress=False
    )
    folder = ws.store.materialize(art.digest)
    assert {p.name for p in folder.iterdir() if not p.name.startswith(".")} == ADAPTER_FILES
    hist = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in hist if "loss" in r]
    vals = [r["val_loss"] for r in hist if "val_loss" in r]
    assert len(losses) == 40 and len(vals) == 4
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3, losses
    assert vals[-1] < vals[0]
    assert (folder / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    facts = json.loads((folder / "finetrace_adapter.json").read_text())
    base_art = ws.ledger.resolve(base)
    assert facts["base_model"] == base_art.digest and facts["parent"] is None
    assert facts["eos_token"] == "<|im_end|>" and facts["chat_template_sha256"].startswith("sha256:")
    assert facts["dataset"] == ws.ledger.resolve("routing").digest
    assert art.kind == "adapter" and art.ref == "toy-lora@1"
    assert art.metadata["target_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    run = ws.ledger.get_run(art.run_id)
    assert run.status == "succeeded" and run.kind == "train"
    assert set(run.inputs) == {base_art.digest, facts["dataset"]} and run.outputs == [art.digest]
    m = run.metrics
    assert m["steps"] == 40 and m["tokens"] > m["target_tokens"] > 0 and m["tokens_per_s"] > 0
    assert m["flops_estimate"] > 0 and m["energy_wh_estimate"] > 0 and m["assumed_watts"] == 35.0
    assert m["final_loss"] == losses[-1]
    assert run.config["lora"]["r"] == 16 and run.config["resolved"]["base_model"] == base_art.digest


@pytest.mark.slow
def test_adapter_loads_with_peft_and_matches_own_loading(tiny_setup, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetrace.train.adapters import load_adapter_weights

    ws, _, _ = tiny_setup
    art = train(ws, make_config(max_steps=4, lr=1e-2), progress=False)
    folder = ws.store.materialize(art.digest)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        plain = base(ids).logits
        peft_logits = PeftModel.from_pretrained(base, str(folder)).eval()(ids).logits
        own = load_adapter_weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), folder)(
            ids
        ).logits
    torch.testing.assert_close(peft_logits, own, rtol=0, atol=1e-6)
    assert (peft_logits - plain).abs().max() > 1e-4  # the adapter does something


@pytest.mark.slow
def test_batch_8_equals_batch_4_with_accumulation_2(tiny_setup):
    ws, _, _ = tiny_setup
    # eps large enough that AdamW's first steps are smooth in the gradient (not sign(g) for g ~ 0)
    a = train(ws, make_config(batch_size=8, grad_accum=1, max_steps=3, eps=1e-3, output_name="b8"), progress=False)
    b = train(ws, make_config(batch_size=4, grad_accum=2, max_steps=3, eps=1e-3, output_name="b4x2"), progress=False)
    ta, tb = adapter_tensors(ws, a), adapter_tensors(ws, b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=1e-5)
    ma, mb = ws.ledger.get_run(a.run_id).metrics, ws.ledger.get_run(b.run_id).metrics
    assert abs(ma["final_loss"] - mb["final_loss"]) < 1e-5 and ma["target_tokens"] == mb["target_tokens"]
    # a token budget splitting each micro-batch further gives the same update too
    c = train(
        ws, make_config(batch_size=8, max_steps=3, eps=1e-3, micro_batch_tokens=60, output_name="b8t"), progress=False
    )
    for k, v in adapter_tensors(ws, c).items():
        torch.testing.assert_close(v, ta[k], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_same_config_and_seed_give_bit_identical_adapter(tiny_setup):
    ws, _, _ = tiny_setup
    cfg = make_config(max_steps=5, lr=1e-2, eval_every=2)
    a = train(ws, cfg, progress=False)
    b = train(ws, cfg, progress=False)
    assert a.digest == b.digest  # every file, byte for byte (the store names folders by content)
    runs = ws.ledger.runs("train")
    assert len(runs) == 2 and all(r.outputs == [a.digest] and r.status == "succeeded" for r in runs)
    c = train(ws, make_config(max_steps=5, lr=1e-2, eval_every=2, seed=1), progress=False)
    assert c.digest != a.digest and c.ref == "toy-lora@2"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rslora", "dora", "full"])
def test_other_methods_train(tiny_setup, method):
    ws, _, _ = tiny_setup
    art = train(ws, make_config(method=method, max_steps=3, lr=1e-3, output_name=f"m-{method}"), progress=False)
    folder = ws.store.materialize(art.digest)
    facts = json.loads((folder / "finetrace_adapter.json").read_text())
    assert facts["method"] == method
    if method == "full":
        assert art.kind == "model" and (folder / "model.safetensors").is_file()
    else:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert cfg["use_rslora"] == (method == "rslora") and cfg["use_dora"] == (method == "dora")


@pytest.mark.slow
def test_init_from_continues_an_adapter(tiny_setup):
    ws, _, _ = tiny_setup
    parent = train(ws, make_config(max_steps=15, lr=1e-2, lora={"r": 4}), progress=False)
    child = train(ws, make_config(max_steps=3, lr=1e-2, init_from="toy-lora@1", output_name="toy-cont"), progress=False)
    facts = json.loads((ws.store.materialize(child.digest) / "finetrace_adapter.json").read_text())
    assert facts["parent"] == parent.digest and facts["r"] == 4 and child.metadata["parent"] == parent.digest
    assert parent.digest in ws.ledger.get_run(child.run_id).inputs
    first = lambda a: json.loads((ws.store.materialize(a.digest) / "metrics.jsonl").read_text().splitlines()[0])
    assert first(child)["loss"] < first(parent)["loss"] - 0.5  # it starts where the parent left off
    with pytest.raises(ConfigError, match="init_from"):
        train(ws, make_config(method="full", init_from="toy-lora@1", output_name="x"), progress=False)


@pytest.mark.slow
def test_early_stopping_keeps_the_best_weights(tiny_setup):
    ws, _, _ = tiny_setup
    # lr far too high: validation loss stops improving quickly
    art = train(
        ws,
        make_config(
            max_steps=40, lr=0.5, eval_every=1, early_stopping_patience=2, max_grad_norm=None, schedule="constant"
        ),
        progress=False,
    )
    m = ws.ledger.get_run(art.run_id).metrics
    assert m["stopped_early"] and m["steps"] < 40
    assert m["best_step"] <= m["steps"] - 2
    assert abs(m["val_loss"] - m["best_val_loss"]) < 1e-6  # the adapter holds the best weights


@pytest.mark.slow
def test_cli_trains_and_reports(tiny_setup, tmp_path, capsys):
    from finetrace.cli import main

    ws, _, _ = tiny_setup
    cfg = tmp_path / "t.yaml"
    cfg.write_text("base_model: tiny\ndataset: toy\noutput_name: cli-lora\nmax_steps: 3\nbatch_size: 4\n")
    assert main(["-w", str(ws.root), "train", str(cfg), "--set", "lora.r=4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["artifact"]["aliases"] == ["cli-lora@1"] and out["metrics"]["steps"] == 3
    assert ws.ledger.get_run(out["run"]).config["lora"]["r"] == 4
    assert main(["-w", str(ws.root), "train", str(cfg)]) == 0
    captured = capsys.readouterr()
    assert "adapter cli-lora@" in captured.out and "tokens/s" in captured.out
    assert "tok/s" in captured.err  # the progress bar
