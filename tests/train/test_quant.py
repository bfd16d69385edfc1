"""Quantised bases (bitsandbytes): QLoRA (NF4, double quant) and 8-bit bases train, record, resume and
give plain PEFT adapters that load on the unquantised base."""

from __future__ import annotations

import json
import signal
import sys
from importlib.util import find_spec

import pytest
import torch
from safetensors.torch import load_file

from finetrace.errors import DependencyError
from finetrace.train import load_config, train

from .train_support import make_config

# checked, not imported, at collection (importing bitsandbytes takes seconds): the tests that use it import it
pytestmark = pytest.mark.skipif(find_spec("bitsandbytes") is None, reason="needs the quant extra (bitsandbytes)")


def _losses(ws, art):
    folder = ws.store.materialize(art.digest)
    return [
        json.loads(line)["loss"]
        for line in (folder / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]


@pytest.mark.slow
def test_qlora_loss_falls_and_the_quantisation_is_recorded(tiny_setup):
    ws, _, _ = tiny_setup
    art = train(
        ws,
        make_config(method="qlora", dataset="routing", max_steps=30, lr=1e-2, schedule="constant", output_name="q"),
        progress=False,
    )
    losses = _losses(ws, art)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:3]) / 3, losses
    native_bf16 = bool({"amx_bf16", "avx512_bf16"} & set(open("/proc/cpuinfo").read().split()))
    compute = "bfloat16" if native_bf16 else "float32"  # auto, on a CPU
    want = {"backend": "bitsandbytes", "bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": compute}
    facts = json.loads((ws.store.materialize(art.digest) / "finetrace_adapter.json").read_text())
    for where in (
        facts["quantization"],
        art.metadata["quantization"],
        ws.ledger.get_run(art.run_id).environment["quantization"],
    ):
        assert {k: where[k] for k in want} == want and where["version"]
    assert facts["method"] == "qlora" and ws.ledger.get_run(art.run_id).config["quantization"]["bits"] == 4


@pytest.mark.slow
def test_qlora_adapter_loads_with_peft_on_the_unquantised_base(tiny_setup, learnable_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetrace.models.quant import load_causal_lm, make_spec

    ws, _, _ = tiny_setup
    art = train(ws, make_config(method="qlora", max_steps=8, lr=1e-2, output_name="q"), progress=False)
    folder = ws.store.materialize(art.digest)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    base = AutoModelForCausalLM.from_pretrained(learnable_model_dir, dtype=torch.float32)
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, str(folder)).eval()
        on_full = tuned(ids).logits
        quant = load_causal_lm(learnable_model_dir, quantization=make_spec(4))
        on_nf4 = PeftModel.from_pretrained(quant, str(folder)).eval()(ids).logits
    assert (on_full - before).abs().max() > 1e-3  # the adapter does something on the fp32 base
    # and what it does there is close to what it does on the NF4 base it was trained on
    assert (on_full - on_nf4).abs().max() < 0.25 * (on_full - before).abs().max() + 0.05


@pytest.mark.slow
def test_eight_bit_base_trains(tiny_setup):
    ws, _, _ = tiny_setup
    art = train(
        ws,
        make_config(
            dataset="routing", quantization={"bits": 8}, max_steps=20, lr=1e-2, schedule="constant", output_name="q8"
        ),
        progress=False,
    )
    losses = _losses(ws, art)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:3]) / 3, losses
    assert art.metadata["quantization"]["bits"] == 8 and art.metadata["method"] == "lora"


@pytest.mark.slow
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_fused_nf4_layer_equals_peft_forward_and_gradients(learnable_model_dir, compute):
    from peft import LoraConfig, get_peft_model

    from finetrace.models.quant import load_causal_lm, make_spec
    from finetrace.train.fused import fuse_lora

    def run(fused: bool):
        torch.manual_seed(0)
        m = load_causal_lm(learnable_model_dir, quantization=make_spec(4, compute_dtype=compute))
        pm = get_peft_model(m, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM"))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
        if fused:
            assert fuse_lora(pm) == 4  # q_proj and down_proj of 2 layers
        ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    la, ga = run(False)
    lb, gb = run(True)
    # the fused layer sums in another order: the reordering error scales with the tensor, not a fixed 1e-6;
    # in bf16 (8 bits of mantissa) it is ~2^-8 of it where fp32's is ~2^-20
    tol = 1e-4 if compute == "float32" else 3e-2
    assert abs(la - lb) < 0.1 * tol * abs(la)
    for k in ga:
        assert ga[k].dtype == torch.float32  # the adapter trains in fp32 in either compute dtype
        torch.testing.assert_close(ga[k], gb[k], rtol=tol, atol=tol * float(ga[k].abs().max()))


def test_qlora_without_bitsandbytes_names_the_extra(tiny_setup, monkeypatch):
    ws, _, _ = tiny_setup
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    with pytest.raises(DependencyError) as err:
        train(ws, make_config(method="qlora"), progress=False)
    assert "finetrace[quant]" in str(err.value) and "pip install 'finetrace[quant]'" in err.value.hint
    assert ws.ledger.runs("train") == []


CONFIG = """base_model: tiny
dataset: toy
output_name: {name}
batch_size: 4
max_steps: 14
lr: 1.0e-2
{quant}
checkpoint_every: 1
keep_checkpoints: 2
seed: 3
"""


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["method: qlora", "quantization:\n  bits: 8"])
def test_sigkill_and_resume_equals_uninterrupted(tiny_setup, tmp_path, quant, zygote):
    from .test_resume import start_child, wait_for_step

    ws, _, _ = tiny_setup
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(CONFIG.format(name="killed", quant=quant))
    proc = start_child(zygote, ws, cfg_file)
    wait_for_step(proc, ws.root / "checkpoints" / "train" / "killed", 5)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    resumed = train(ws, load_config(cfg_file), resume=True, progress=False)
    assert ws.ledger.get_run(resumed.run_id).metrics["resumed_from_step"] >= 5
    (tmp_path / "straight.yaml").write_text(CONFIG.format(name="straight", quant=quant))
    straight = train(ws, load_config(tmp_path / "straight.yaml"), progress=False)
    a = load_file(ws.store.materialize(resumed.digest) / "adapter_model.safetensors")
    b = load_file(ws.store.materialize(straight.digest) / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_qlora_adapter_is_evaluated_on_its_quantised_base_and_documents_say_so(tiny_setup):
    from finetrace.audit.documents import generate_documents
    from finetrace.evaluate import Suite, evaluate, load_report

    ws, _, _ = tiny_setup
    art = train(
        ws, make_config(method="qlora", dataset="routing", max_steps=12, lr=1e-2, output_name="q"), progress=False
    )
    suite = Suite.model_validate(
        {
            "name": "r",
            "split": "validation",
            "metrics": ["accuracy"],
            "scoring": "constrained",
            "bootstrap": {"samples": 20, "seed": 0},
            "bias": {"enabled": False},
            "forgetting": {"enabled": False},
        }
    )
    on_nf4 = load_report(ws, evaluate(ws, "tiny", "routing", adapter_ref=art.ref, suite=suite, name="e4").ref)
    on_fp32 = load_report(
        ws, evaluate(ws, "tiny", "routing", adapter_ref=art.ref, suite=suite, name="e32", quantized_base=False).ref
    )
    q = on_nf4["base_model"]["quantization"]
    assert q["bits"] == 4 and q["quant_type"] == "nf4" and on_fp32["base_model"]["quantization"] is None
    # the same adapter scored on both bases: the difference is measured, and it is small on this task
    acc = lambda rep: next(m for m in rep["models"] if m["adapter"])["metrics"]["accuracy"]["value"]  # noqa: E731
    assert abs(acc(on_nf4) - acc(on_fp32)) <= 0.25
    docs = generate_documents(ws, art.ref)
    text = {d.metadata["document"]: p.read_text() for d in docs for p in ws.store.materialize(d.digest).glob("*.md")}
    card = next(v for k, v in text.items() if "card" in k)
    annex = next(v for k, v in text.items() if "annex" in k)
    assert "Base during training: 4-bit NF4 with double quantisation (bitsandbytes" in card
    assert "base model 4-bit NF4" in card and "base model not quantised" in card
    assert "Base precision during training: 4-bit NF4 with double quantisation" in annex
