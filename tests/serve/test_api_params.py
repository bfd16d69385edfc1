"""API parameters over loopback with the official client: n, logprobs, labels, seed, max_tokens bounds;
and a model whose chat template is not ChatML stops at its own end-of-turn token."""

from __future__ import annotations

import openai
import pytest

from finetrace.serve.engine import Engine
from finetrace.serve.server import BackgroundServer
from finetrace.serve.settings import ServeSettings

MSG = [{"role": "user", "content": "Route this ticket: my invoice is wrong"}]
LABELS = ["billing", "technical", "account", "bill"]


@pytest.fixture(scope="module")
def api(served_ws):
    settings = ServeSettings(max_batch=8)
    with BackgroundServer(Engine(served_ws, "tiny", ["alpha@1", "beta@1"], settings), settings) as srv:
        yield srv, openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)


def test_n_choices_seeded_and_distinct(api):
    _, client = api
    r = client.chat.completions.create(model="alpha@1", messages=MSG, max_tokens=6, temperature=1.5, n=3, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    again = client.chat.completions.create(model="alpha@1", messages=MSG, max_tokens=6, temperature=1.5, n=3, seed=5)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    assert len({c.message.content for c in r.choices}) > 1  # seeds 5, 6, 7 differ
    assert r.usage.completion_tokens > 0
    assert len(r.model_extra["provenance_ids"]) == 3


def test_greedy_logprobs_are_the_models(api, served_ws):
    import torch

    _, client = api
    r = client.chat.completions.create(
        model="tiny",
        messages=MSG,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"return_token_ids": True},
    )
    c = r.choices[0]
    ids = c.model_extra["token_ids"]
    assert len(c.logprobs.content) == len(ids) > 0
    from finetrace.decoding import encode_chat
    from finetrace.models import load_model

    model, tok, _ = load_model(served_ws, "tiny")
    prompt = encode_chat(tok, MSG)
    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.tensor([prompt + ids])).logits[0].float(), -1)
    for j, (t, entry) in enumerate(zip(ids, c.logprobs.content)):
        assert entry.logprob == pytest.approx(float(lp[len(prompt) - 1 + j, t]), abs=1e-4)
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6  # greedy picked the top token
        assert len(entry.top_logprobs) == 3


def test_label_constraint_answers_a_label_with_scored_logprobs(api, served_ws):
    from finetrace.evaluate.generation import score_labels
    from finetrace.models.generate import load_for_chat

    _, client = api
    r = client.chat.completions.create(
        model="beta@1",
        messages=MSG,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=4,
        extra_body={"labels": LABELS},
    )
    c = r.choices[0]
    assert c.message.content in LABELS and c.finish_reason == "stop"
    model, tok, _ = load_for_chat(served_ws, "tiny", "beta@1")
    preds, scores = score_labels(model, tok, [MSG], LABELS)
    assert c.message.content == preds[0]
    got = {e.token: e.logprob for e in c.logprobs.content[0].top_logprobs}
    assert got == pytest.approx(dict(zip(LABELS, scores[0])), abs=1e-4)


def test_bad_params_are_openai_400s(api):
    _, client = api
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=4000)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSG, n=0)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSG, extra_body={"labels": []})
    assert e.value.body["param"] == "labels"


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    """A tiny model with its own chat format: turns end with ``<|end|>`` (id 0), eos is ``<|endoftext|>``.
    Its final norm is zero, so every logit ties and greedy picks id 0: the end of turn, at once."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetrace.models.tiny import build_tiny_model, build_tokenizer

    template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    tok = build_tokenizer(
        special=["<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"],
        eos="<|endoftext|>",
        template=template,
    )
    out = build_tiny_model(tmp_path_factory.mktemp("plain"), tokenizer=tok)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(out, safe_serialization=True)
    return out


def test_non_chatml_model_stops_at_its_own_end_of_turn(plain_model, tmp_path):
    from transformers import AutoTokenizer

    from finetrace.decoding import end_ids
    from finetrace.models import add_folder
    from finetrace.models.generate import ChatStats, load_for_chat, stream_chat
    from finetrace.workspace import Workspace

    from .serve_support import make_adapter

    tok = AutoTokenizer.from_pretrained(plain_model)
    end = tok.convert_tokens_to_ids("<|end|>")
    assert end == 0 and tok.eos_token_id != end and end in end_ids(tok)
    ws = Workspace.init(tmp_path / "ws")
    base = add_folder(ws, plain_model, "plain")
    make_adapter(ws, base, tok, plain_model, "plainlora", 3, tmp_path)
    eng = Engine(ws, "plain", ["plainlora@1"], ServeSettings())
    eng.start()
    try:
        res = eng.generate("plainlora@1", messages=[{"role": "user", "content": "hello"}], max_tokens=10)
    finally:
        eng.stop()
    assert (res.finish_reason, res.completion_tokens, res.text) == ("stop", 0, "")
    model, t2, _ = load_for_chat(ws, "plain", "plainlora@1")
    stats = ChatStats()
    assert "".join(stream_chat(model, t2, [{"role": "user", "content": "hi"}], max_new_tokens=10, stats=stats)) == ""
    assert stats.finish_reason == "stop" and stats.token_ids == [end]
    ws.close()
