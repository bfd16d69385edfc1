"""The fused LoRA layer computes what peft computes (outputs and every gradient) and steps aside otherwise."""

from __future__ import annotations

import pytest
import torch

from finetrace.train import data as D
from finetrace.train.adapters import load_base
from finetrace.train.fused import LoraLinearFn, fuse_lora
from finetrace.train.loss import loss_sum


def _peft_model(tiny_model_dir, **lora):
    from peft import LoraConfig, get_peft_model

    model, tok = load_base(tiny_model_dir)
    torch.manual_seed(0)
    cfg = dict(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    cfg.update(lora)
    model = get_peft_model(model, LoraConfig(**cfg))
    with torch.no_grad():  # B starts at zero: make the update non-trivial so the check means something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.train()
    return model, tok


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    ls = loss_sum(model, batch)
    ls.backward()
    return float(ls), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_layer_matches_the_textbook_formula():
    torch.manual_seed(1)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(7, 12, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    a = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, bb: LoraLinearFn.apply(x, w, b, a, bb, 0.5), (x, a, bb))
    ref = x @ w.t() + b + 0.5 * (x @ a.t()) @ bb.t()
    assert torch.allclose(LoraLinearFn.apply(x, w, b, a, bb, 0.5), ref)


@pytest.mark.slow
@pytest.mark.parametrize("use_rslora", [False, True])
def test_fused_model_equals_peft_model(tiny_model_dir, use_rslora):
    model, tok = _peft_model(tiny_model_dir, use_rslora=use_rslora)
    batch = D.collate(
        [
            D.encode(tok, [{"role": "user", "content": "Repeat: fox dog"}], "dog fox"),
            D.encode(tok, [{"role": "user", "content": "What is the capital of France?"}], "Paris."),
        ],
        True,
        tok.pad_token_id,
    )
    loss_peft, grads_peft = _loss_and_grads(model, batch)
    assert fuse_lora(model) == 14  # 7 linear layers x 2 decoder layers of the tiny model
    loss_fused, grads_fused = _loss_and_grads(model, batch)
    assert abs(loss_fused - loss_peft) < 1e-5 * abs(loss_peft)
    assert grads_fused.keys() == grads_peft.keys() and len(grads_fused) == 28
    for name, g in grads_peft.items():
        assert torch.allclose(grads_fused[name], g, rtol=1e-4, atol=1e-6), name
    assert fuse_lora(model) == 0  # idempotent


def test_fallbacks_use_peft_forward(tiny_model_dir):
    model, tok = _peft_model(tiny_model_dir)
    fuse_lora(model)
    ids = torch.tensor([tok("hello world")["input_ids"]])
    with torch.no_grad():
        with model.disable_adapter():  # the reference policy of DPO: the base model alone
            off = model(input_ids=ids).logits
        on = model(input_ids=ids).logits
    base, _ = load_base(tiny_model_dir)
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    assert torch.allclose(off, plain, atol=1e-6)
    assert not torch.allclose(on, plain, atol=1e-3)  # the adapter does act when enabled

    dora, _ = _peft_model(tiny_model_dir, use_dora=True)
    assert fuse_lora(dora) == 0  # DoRA keeps peft's own forward
