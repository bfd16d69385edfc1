"""Compiled element-wise kernels: same loss and gradients as eager, only where they are right, eager otherwise."""

from __future__ import annotations

import pytest
import torch

from finetrace.train import data as D
from finetrace.train import kernels
from finetrace.train.adapters import apply_method, load_base
from finetrace.train.loss import loss_sum

from .train_support import make_config


def _model(tiny_model_dir):
    model, tok = load_base(tiny_model_dir)
    model, _ = apply_method(model, make_config(), None)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.train()
    return model, tok


def _batch(tok):
    return D.collate(
        [
            D.encode(tok, [{"role": "user", "content": "Repeat: fox dog model"}], "model dog fox"),
            D.encode(tok, [{"role": "user", "content": "What is the capital of France?"}], "Paris."),
        ],
        True,
        tok.pad_token_id,
    )


def _loss_grads(model, batch):
    model.zero_grad(set_to_none=True)
    ls = loss_sum(model, batch)
    ls.backward()
    return float(ls.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow  # compiles three Inductor kernels (~8 s)
def test_compiled_kernels_match_eager(tiny_model_dir):
    import transformers.models.llama.modeling_llama as llama

    model, tok = _model(tiny_model_dir)
    batch = _batch(tok)
    eager_loss, eager_grads = _loss_grads(model, batch)
    rng = torch.get_rng_state()
    counts = kernels.fuse_elementwise(model)
    assert torch.equal(torch.get_rng_state(), rng)  # probes never move the RNG that dropout and data use
    # tiny model: 2 decoder layers x 2 norms + the final norm; 2 MLPs; one modeling module's rotary
    assert counts == {"rms_norm": 5, "mlp": 2, "rotary": 1}
    assert hasattr(llama.apply_rotary_pos_emb, "_finetrace_original")
    loss, grads = _loss_grads(model, batch)
    assert abs(loss - eager_loss) <= 1e-5 * abs(eager_loss)
    for name, g in eager_grads.items():
        assert torch.allclose(grads[name], g, rtol=1e-4, atol=1e-6), name
    # no gradients recorded (generation, serving): the original rotary function runs
    with torch.no_grad():
        ids = batch.input_ids
        assert torch.allclose(model(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.slow
def test_a_different_norm_is_left_alone():
    class GemmaLikeRMSNorm(torch.nn.Module):  # x * rsqrt(mean x^2) * (1 + w): not Llama's formula
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(16), requires_grad=False)
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)

    holder = torch.nn.Sequential(GemmaLikeRMSNorm())
    assert kernels.fuse_elementwise(holder)["rms_norm"] == 0
    assert "forward" not in holder[0].__dict__


def test_compile_failure_falls_back_to_eager(tiny_model_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    model, tok = _model(tiny_model_dir)
    monkeypatch.setattr(kernels.torch, "compile", lambda fn, **kw: broken)
    monkeypatch.setattr(kernels, "_COMPILED", {})
    monkeypatch.setattr(kernels, "_BROKEN", [])
    with pytest.warns(RuntimeWarning, match="no C.. compiler"):
        counts = kernels.fuse_elementwise(model)
    assert counts == {"rms_norm": 0, "mlp": 0, "rotary": 0}
    loss, _ = _loss_grads(model, _batch(tok))  # still trains, eagerly
    assert loss > 0


def test_a_kernel_failing_at_first_use_falls_back_to_eager(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("InductorError: C++ compile error")

    monkeypatch.setattr(kernels.torch, "compile", lambda fn, **kw: broken)
    monkeypatch.setattr(kernels, "_COMPILED", {})
    monkeypatch.setattr(kernels, "_BROKEN", [])
    x, w = torch.randn(3, 8), torch.ones(8)
    with pytest.warns(RuntimeWarning, match="C.. compile error"):
        y = kernels.run("rms_norm", kernels.rms_norm, (True, x.dtype, 8, False), x, w, 1e-6)
    assert torch.allclose(y, kernels.rms_norm(x, w, 1e-6))
    assert kernels.compiled("rms_norm", kernels.rms_norm, "any") is None  # off for the rest of the process
