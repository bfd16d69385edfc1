"""The lean decode forward (decoding/lean.py) computes what the model's own forward computes: same logits,
same tokens over mixed-adapter continuous batches with chunked prefill; anything it does not cover falls
back to the model's forward; a PeftModel decoded without a selector runs its active adapter; fp16 decode
weights (decoding/packed.py) are the model's own weights rounded, and every path agrees on them."""

from __future__ import annotations

import pytest
import torch

from finetrace.decoding import BASE, Decoder, Seq, encode_chat
from finetrace.decoding.lean import lean_forward
from finetrace.decoding.lora import PeftMixed, adapter_selector

PROMPTS = [[{"role": "user", "content": f"question {i} about {'river ' * (i % 5)}and {i * 7}"}] for i in range(10)]


def _decode(model, tok, sel, names, lean: bool, chunk: int = 7, weights: str = "fp32"):
    dec = Decoder(model, tok, sel, max_batch=4, prefill_chunk=chunk, weights=weights)
    if not lean:  # force the model's own forward
        dec._lean_key, dec._lean = (model, sel), None
    seqs = [Seq(encode_chat(tok, p), n, max_tokens=10) for p, n in zip(PROMPTS, names)]
    dec.run(seqs)
    return [s.ids for s in seqs], dec


@pytest.mark.slow
def test_lean_tokens_equal_the_model_forward_on_mixed_adapter_batches(two_adapters):
    model, tok = two_adapters
    sel = adapter_selector(model, "gathered", ["alpha", "beta"])
    names = [["alpha", "beta", BASE][i % 3] for i in range(len(PROMPTS))]
    lean_ids, dec = _decode(model, tok, sel, names, lean=True)
    assert dec.lean() is not None
    hf_ids, _ = _decode(model, tok, sel, names, lean=False)
    assert lean_ids == hf_ids
    assert len({tuple(x) for x in lean_ids}) >= 3
    on_a, _ = _decode(model, tok, sel, ["alpha"] * len(PROMPTS), lean=True)  # the adapter changes the answers
    assert on_a != lean_ids


def test_lean_logits_match_for_prefill_and_decode(two_adapters):
    from finetrace.decoding.kvcache import slab_cache

    model, tok = two_adapters
    sel = adapter_selector(model, "gathered", ["alpha", "beta"])
    dec = Decoder(model, tok, sel, weights="fp32")
    lean = dec.lean()
    rows = [encode_chat(tok, PROMPTS[i]) for i in (0, 3)]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        sel.select(["alpha", "beta"])
        c1, c2 = slab_cache(2), slab_cache(2)
        got = lean.forward(ids, mask, pos, c1.layers)
        want = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=c2, use_cache=True).logits[:, -1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        nxt = got.argmax(-1, keepdim=True)
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        got = lean.forward(nxt, mask2, pos[:, -1:] + 1, c1.layers)
        want = model(
            input_ids=nxt, attention_mask=mask2, position_ids=pos[:, -1:] + 1, cache=c2, use_cache=True
        ).logits[:, -1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_what_lean_does_not_cover_falls_back_to_the_model_forward(two_adapters, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model, _ = two_adapters
    assert lean_forward(model, PeftMixed()) is None  # PEFT's mixed batches: its own forward
    assert lean_forward(model, None) is None  # LoRA layers no selector drives
    bare = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert lean_forward(bare, None) is not None
    bare.model.layers[1].mlp.up_proj = torch.nn.Sequential(bare.model.layers[1].mlp.up_proj)
    assert lean_forward(bare, None) is None  # a projection that is not a plain Linear


def test_a_peft_model_without_selector_decodes_its_active_adapter(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    peft.eval()
    prompt = encode_chat(tok, PROMPTS[2])
    with torch.inference_mode():  # PEFT's own greedy loop, no cache: the reference
        ids = list(prompt)
        for _ in range(8):
            ids.append(int(peft(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    dec = Decoder(peft, tok, max_batch=1, weights="fp32")
    assert dec.lean() is not None
    seq = Seq(prompt, max_tokens=8, normalise=False)
    dec.run([seq])
    assert seq.ids == ids[len(prompt) : len(prompt) + len(seq.ids)] and len(seq.ids) >= 1


@pytest.mark.slow
@pytest.mark.skipif(not __import__("finetrace.decoding.packed", fromlist=["x"]).fp16_kernels(), reason="no fbgemm")
def test_fp16_weights_are_the_models_own_weights_rounded_and_every_path_agrees(two_adapters):
    import copy

    from finetrace.decoding.kvcache import slab_cache

    model, tok = two_adapters
    original = copy.deepcopy(model.get_base_model())
    sel = adapter_selector(model, "gathered", ["alpha", "beta"])
    dec = Decoder(model, tok, sel, weights="fp16")  # rounds the model's base weights in place
    assert dec.weights == "fp16" and dec.lean().packed() is not None
    base = model.get_base_model()
    q = base.model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(q, q.half().float()) and not torch.equal(q, original.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(base.model.norm.weight, original.model.norm.weight)  # norms untouched
    rows = [encode_chat(tok, PROMPTS[i]) for i in (1, 4, 6)]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        # mixed rows, then all rows on one adapter (the fused q/k/v and gate/up LoRA pairs)
        for names in (["alpha", BASE, "beta"], ["alpha"] * 3, ["beta"] * 3):
            sel.select(names)
            got = dec.lean().forward(ids, mask, pos, slab_cache(2).layers)
            want = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=slab_cache(), use_cache=True)
            torch.testing.assert_close(got, want.logits[:, -1], atol=1e-5, rtol=1e-5)
    names = [["alpha", "beta", BASE][i % 3] for i in range(len(PROMPTS))]
    fp16_ids, _ = _decode(model, tok, sel, names, lean=True, weights="fp16")
    model_ids, _ = _decode(model, tok, sel, names, lean=False, weights="fp16")
    assert fp16_ids == model_ids  # the lean fp16 path == the model's own forward on its (rounded) weights
    packed = dec.lean().packed()
    with torch.no_grad():  # a changed base weight is repacked, not served stale
        base.lm_head.weight.mul_(1.0)
    assert dec.lean().packed() is not packed


def test_label_scores_agree_on_the_lean_and_the_model_forward(two_adapters):
    """Label scoring runs on the decoder's forward: the lean one for gathered LoRA, the model's own for
    PEFT's mixed batches (a slab cache either way, the shared prefix repeated into rows, the label
    tokens cropped off between passes); both give the same scores on mixed-adapter batches."""
    from finetrace.decoding.labels import score_prompts

    model, tok = two_adapters
    system = [{"role": "system", "content": "Sort the question into one of the labels, nothing else."}]
    rows = [encode_chat(tok, system + p) for p in PROMPTS]
    names = [["alpha", "beta", BASE][i % 3] for i in range(len(rows))]
    labels = ["river", "rivers", "question", "other answer"]
    lean = score_prompts(model, tok, rows, labels, adapter_selector(model, "gathered", ["alpha", "beta"]), names, 4)
    mixed = score_prompts(model, tok, rows, labels, PeftMixed(), names, 4)
    assert mixed == [pytest.approx(r, abs=1e-4) for r in lean]
    assert len({tuple(round(x, 3) for x in r) for r in lean}) > 3  # adapters and prompts change the scores
    best = score_prompts(model, tok, rows, labels, PeftMixed(), names, 4, best_only=True)
    assert all(b is None or b == pytest.approx(a, abs=1e-4) for r, q in zip(lean, best) for a, b in zip(r, q))
