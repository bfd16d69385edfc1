"""Batched generation and label scoring on the tiny model, checked against one-at-a-time references."""

from __future__ import annotations

import pytest

from finetrace.evaluate import generation as G


@pytest.fixture(scope="module")
def lm(varied_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(varied_model_dir)
    model.eval()
    return model, AutoTokenizer.from_pretrained(varied_model_dir)


PROMPTS = [[{"role": "user", "content": "hello world " * k + "contract"}] for k in range(1, 8)]


def _reference(model, tok, prompt, max_new_tokens):
    """Plain transformers generate, one prompt, no padding: what the batched path must reproduce."""
    import torch

    ids = tok(G.render(tok, prompt), return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    new = out[0, ids.input_ids.shape[1] :].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return new


def test_batched_generation_equals_one_at_a_time(lm):
    model, tok = lm
    answers = G.generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=3)
    refs = [tok.decode(_reference(model, tok, p, 10), skip_special_tokens=True).strip() for p in PROMPTS]
    assert answers == refs
    assert len(set(answers)) > 3  # the outputs really differ from prompt to prompt


def test_max_new_tokens_and_stop_strings(lm):
    model, tok = lm
    short = G.generate(model, tok, PROMPTS[:2], max_new_tokens=3, batch_size=2)
    for p, a in zip(PROMPTS[:2], short):
        assert a == tok.decode(_reference(model, tok, p, 3), skip_special_tokens=True).strip()
    full = G.generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=4)
    # pick a character that occurs inside some answer and use it as a stop string
    ans = next(a for a in full if len(a) > 4)
    stop = ans[2]
    cut = G.generate(model, tok, PROMPTS, max_new_tokens=10, stop=[stop], batch_size=4)
    for a, c in zip(full, cut):
        assert c == a.split(stop)[0].strip() if stop in a else c == a
    assert G.cut_at_stop("abc\n\ndef###", ["###", "\n\n"]) == "abc"


SYSTEM = [{"role": "system", "content": "Route the support ticket of the customer to the right team."}]


@pytest.mark.parametrize("prompts", [PROMPTS[:4], [SYSTEM + p for p in PROMPTS[:5]]], ids=["plain", "shared-prefix"])
def test_label_scores_are_summed_logprobs_with_end_token(lm, prompts):
    """Also when the batch's common prefix (a system turn) is run once and its cache shared by the rows."""
    import torch

    from finetrace.decoding.labels import MIN_SHARED, _shared_prefix

    model, tok = lm
    labels = ["billing", "technical", "account", "bill"]
    preds, scores = G.score_labels(model, tok, prompts, labels, batch_size=5)
    rows = [tok(G.render(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
    assert (_shared_prefix(rows) >= MIN_SHARED) == (prompts[0][0]["role"] == "system")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for p, row, pred in zip(prompts, scores, preds):
        prompt_ids = tok(G.render(tok, p), add_special_tokens=False)["input_ids"]
        for lab, got in zip(labels, row):
            cont = tok(lab, add_special_tokens=False)["input_ids"] + [end]
            ids = torch.tensor([prompt_ids + cont])
            with torch.inference_mode():
                logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            want = sum(float(logp[len(prompt_ids) - 1 + j, t]) for j, t in enumerate(cont))
            assert got == pytest.approx(want, abs=1e-4)
        assert pred == labels[max(range(len(labels)), key=lambda j: row[j])]


def test_text_nll_matches_per_text_sums(lm):
    model, tok = lm
    texts = ["The quick brown fox jumps.", "A contract is an agreement between parties to it."]
    joint = G.text_nll(model, tok, texts, batch_size=2)
    parts = [G.text_nll(model, tok, [t], batch_size=1) for t in texts]
    assert joint[1] == sum(n for _, n in parts)
    assert joint[0] == pytest.approx(sum(s for s, _ in parts), rel=1e-5)


def test_text_nll_is_the_models_own_next_token_nll(lm):
    import torch

    model, tok = lm
    texts = ["The quick brown fox jumps over the lazy dog.", "Notice.", "A contract is an agreement between parties."]
    total, n = G.text_nll(model, tok, texts, batch_size=3)  # left-padded together, through the decoder
    want, count = 0.0, 0
    for t in texts:  # each text alone through the model's own forward (on the weights the decoder rounded)
        ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        want -= float(logp.gather(-1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    assert n == count
    assert total == pytest.approx(want, rel=1e-4)


def _best_only_agrees(model, tok, prompts, labels) -> int:
    """best_only's predictions are the full scores' and its scores the full ones; returns how many it skipped."""
    preds, full = G.score_labels(model, tok, prompts, labels, batch_size=4)
    best, part = G.score_labels(model, tok, prompts, labels, batch_size=4, best_only=True)
    assert best == preds
    assert all(p[labels.index(w)] is not None for p, w in zip(part, best))
    for f, p in zip(full, part):
        for a, b in zip(f, p):
            assert b is None or b == pytest.approx(a, rel=1e-6, abs=1e-5)
    return sum(b is None for p in part for b in p)


def test_best_only_label_scoring_finds_the_same_labels_with_fewer_scores(lm, monkeypatch):
    """Cutting pass 2 short (a label's score is at most its first token's log p) changes no prediction.
    On the random model every label can still win after the first pass (nothing skipped); once the model
    prefers one label (its tokens' logits raised, as tuning does), the others are never scored."""
    from finetrace.decoding.batch import Decoder

    model, tok = lm
    prompts = [SYSTEM + p for p in PROMPTS] + PROMPTS
    labels = ["billing", "bill", "technical", "account", "accounting", "refund request", "other"]
    _best_only_agrees(model, tok, prompts, labels)
    liked = tok("technical", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    forward = Decoder.forward

    def prefer(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out[..., liked] += 12.0
        return out

    monkeypatch.setattr(Decoder, "forward", prefer)
    skipped = _best_only_agrees(model, tok, prompts, labels)
    assert skipped >= 0.9 * len(prompts) * (len(labels) - 1)  # about one label scored per prompt
