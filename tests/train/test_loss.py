"""The loss: targets only (eos included although pad == eos), packed == padded, chunked == full logits."""

from __future__ import annotations

import pytest
import torch

from finetrace.train import data as D
from finetrace.train.adapters import load_base
from finetrace.train.loss import loss_sum, reference_loss_sum


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    torch.manual_seed(0)
    model, tok = load_base(tiny_model_dir)
    model.train()
    return model, tok


def examples(tok):
    items = [
        ([{"role": "user", "content": "Repeat: fox dog"}], "dog fox"),
        (
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}],
            "Paris.",
        ),
        ([{"role": "user", "content": "Label: positive negative neutral. The quick brown fox"}], "neutral"),
    ]
    return [D.encode(tok, m, t) for m, t in items]


def test_loss_is_on_target_and_eos_only(model_tok):
    model, tok = model_tok
    assert tok.pad_token_id == tok.eos_token_id  # the trap this guards against
    ex = examples(tok)
    for e in ex:
        assert e.ids[-1] == tok.eos_token_id
        prompt = tok.decode(e.ids[: e.n_prompt])
        assert prompt.endswith("<|im_start|>assistant\n") and "<|im_end|>" in prompt  # prompt turns masked
    b = D.collate_packed(ex)
    assert b.n_targets == sum(e.n_target for e in ex)
    # every target id is exactly the target text followed by eos, and predicted from the previous position
    flat = b.input_ids[0]
    assert torch.equal(flat[b.loss_index + 1], b.targets)
    off = 0
    for e in ex:
        want = tok(tok.decode(e.ids[e.n_prompt : -1]), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        got = b.targets[off : off + e.n_target].tolist()
        assert got == want
        off += e.n_target
    # one eos target per example although eos is also the pad id: the stop token is learned
    assert int((b.targets == tok.eos_token_id).sum()) == len(ex)


def test_packed_equals_unpacked_and_chunked_equals_full_logits(model_tok):
    model, tok = model_tok
    ex = examples(tok)
    packed, padded = D.collate_packed(ex), D.collate_padded(ex, tok.pad_token_id)
    assert padded.input_ids.shape[0] == 3 and packed.input_ids.shape[0] == 1
    torch.set_grad_enabled(False)
    lp = loss_sum(model, packed, chunk=16)
    lu = reference_loss_sum(model, padded)  # padded batch, attention mask, full logits
    lr = reference_loss_sum(model, packed)  # packed, full logits
    singles = sum(float(reference_loss_sum(model, D.collate_padded([e], 0))) for e in ex)
    assert abs(float(lp) - float(lu)) < 1e-5 * max(1.0, abs(float(lu)))
    assert abs(float(lr) - float(lu)) < 1e-5 * max(1.0, abs(float(lu)))
    assert abs(float(lp) - singles) < 1e-5 * max(1.0, singles)
    # without per-example attention the packed loss differs: the test can fail
    from finetrace.train.attention import segments

    with segments(None):
        backbone = model.base_model
        h = backbone(input_ids=packed.input_ids, use_cache=False).last_hidden_state  # plain causal over the row
    leak = torch.nn.functional.cross_entropy(model.lm_head(h[0][packed.loss_index]), packed.targets, reduction="sum")
    torch.set_grad_enabled(True)
    assert abs(float(leak) - float(lu)) > 1e-3


@pytest.mark.slow
def test_chunked_gradients_match_full_logits(model_tok):
    model, tok = model_tok
    ex = examples(tok)
    packed, padded = D.collate_packed(ex), D.collate_padded(ex, tok.pad_token_id)
    params = [p for p in model.parameters()]
    model.zero_grad()
    loss_sum(model, packed, chunk=7).backward()
    g1 = [p.grad.clone() for p in params]
    model.zero_grad()
    reference_loss_sum(model, padded).backward()
    g2 = [p.grad.clone() for p in params]
    model.zero_grad()
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # lm_head (tied) grads included
