"""Packed attention: the per-example loop (CPU) and the one masked call (GPUs) give the same loss and gradients."""

from __future__ import annotations

import torch

from finetrace.train import attention
from finetrace.train import data as D
from finetrace.train.adapters import apply_method, load_base
from finetrace.train.loss import loss_sum

from .train_support import make_config


def test_block_causal_mask():
    mask = attention.block_causal_mask([0, 2, 5], "cpu")
    want = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(mask, want)


def test_masked_call_equals_per_example_loop(tiny_model_dir, monkeypatch):
    model, tok = load_base(tiny_model_dir)
    model, _ = apply_method(model, make_config(compile=False), None)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    items = [("Repeat: fox dog", "dog fox"), ("What is the capital of France?", "Paris."), ("Label it", "neutral")]
    batch = D.collate([D.encode(tok, [{"role": "user", "content": q}], a) for q, a in items], True, tok.pad_token_id)
    assert len(batch.cu_seqlens) == 4

    def run():
        model.zero_grad(set_to_none=True)
        ls = loss_sum(model, batch)
        ls.backward()
        return float(ls.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loop_loss, loop_grads = run()
    monkeypatch.setattr(attention, "PER_EXAMPLE_DEVICES", set())  # what a GPU does
    masked_loss, masked_grads = run()
    assert abs(masked_loss - loop_loss) <= 1e-5 * abs(loop_loss)
    for name, g in loop_grads.items():
        assert torch.allclose(masked_grads[name], g, rtol=1e-4, atol=1e-6), name
    monkeypatch.setattr(attention, "MASKED_MAX_TOKENS", 4)  # too long for a mask: back to the loop
    assert abs(run()[0] - loop_loss) <= 1e-5 * abs(loop_loss)
