"""Gradient checkpointing composes with packing, the fused LoRA layer (also on an NF4 base), the compiled
kernels and the chunked loss: the same loss and gradients as without it."""

from __future__ import annotations

import pytest
import torch

from finetrace.train import data as D
from finetrace.train.attention import segments
from finetrace.train.fused import LoraLinearFn
from finetrace.train.kernels import fuse_elementwise
from finetrace.train.loss import loss_sum


def _model(model_dir, quantized: bool):
    from peft import LoraConfig, get_peft_model

    from finetrace.models.quant import make_spec
    from finetrace.train.adapters import load_weights
    from finetrace.train.fused import fuse_lora

    model = load_weights(model_dir, quantization=make_spec(4) if quantized else None)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    assert fuse_lora(model) == 6
    fuse_elementwise(model)
    model.train()
    return model


def counted_batch(model_dir, monkeypatch):
    """A packed batch of 4 examples, and a list that grows by one for every fused LoRA forward."""
    from transformers import AutoTokenizer

    calls: list[int] = []
    original = LoraLinearFn.forward
    monkeypatch.setattr(LoraLinearFn, "forward", staticmethod(lambda ctx, *a: calls.append(1) or original(ctx, *a)))
    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = [
        D.encode(tok, [{"role": "user", "content": f"question {i} " * (i + 2)}], f"answer {i} " * (3 + i))
        for i in range(4)
    ]
    return calls, D.collate(examples, packing=True, pad_id=tok.pad_token_id)


def _loss_and_grads(model, batch, counter):
    model.zero_grad(set_to_none=True)
    counter.clear()
    with segments(batch.cu_seqlens):
        ls = loss_sum(model, batch, chunk=16)  # several chunks of target positions
        ls.backward()
    return float(ls), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(counter)


@pytest.mark.slow  # compiles the fused element-wise kernels (~7 s the first time in a process)
@pytest.mark.parametrize("quantized", [False, True])
def test_checkpointing_gives_the_same_loss_and_gradients(learnable_model_dir, monkeypatch, quantized):
    if quantized:
        pytest.importorskip("bitsandbytes")

    calls, batch = counted_batch(learnable_model_dir, monkeypatch)
    assert batch.cu_seqlens is not None and batch.n_targets > 32
    model = _model(learnable_model_dir, quantized)
    plain_loss, plain, plain_calls = _loss_and_grads(model, batch, calls)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ck_loss, ck, ck_calls = _loss_and_grads(model, batch, calls)
    assert plain_calls == 6 and ck_calls == 12  # the fused layer ran in forward, and again in the recompute
    assert abs(plain_loss - ck_loss) < 1e-5
    assert plain.keys() == ck.keys()
    for k in plain:
        torch.testing.assert_close(ck[k], plain[k], rtol=1e-4, atol=1e-6)
