"""Structured answers: response_format json_schema / json_object by constrained decoding (answers of a random
tiny model always parse and validate), OpenAI 400s for unusable schemas, and the llguidance hint."""

from __future__ import annotations

import json
import random
import threading

import openai
import pytest

from finetrace.serve.engine import Engine
from finetrace.serve.request import GenRequest
from finetrace.serve.server import BackgroundServer
from finetrace.serve.settings import ServeSettings

from .serve_support import validate_json

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "age", "ok", "tags"],
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "level": {"enum": ["low", "high", 3, None]},
    },
}
# (no free "number": a random model may write digits forever, and that answer ends at max_tokens)
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "contract",
    "supplier",
    "invoice",
    "data",
    "governance",
    "billing",
    "answer",
    "label",
    "clause",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a loaded 2-core machine run ~10x faster on one thread than on two fighting ones."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def api(served_ws):
    settings = ServeSettings(max_batch=16, max_queue=128)
    with BackgroundServer(Engine(served_ws, "tiny", ["alpha@1"], settings), settings) as srv:
        yield srv, openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)


def _prompts(n: int, seed: int = 7) -> list[str]:
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 12))) for _ in range(n)]


@pytest.mark.slow  # ~7 s on a loaded machine
def test_json_schema_answers_parse_and_validate_for_100_random_prompts(api):
    """Random weights, random prompts, greedy and sampled rows batched together: every answer validates."""
    srv, _ = api
    engine = srv.engine
    grammar = engine.compile_schema(SCHEMA)
    done, results = threading.Semaphore(0), {}

    def on_event(i):
        def cb(kind, value):
            if kind in ("done", "error"):
                results[i] = value
                done.release()

        return cb

    for i, p in enumerate(_prompts(100)):
        engine.submit(
            GenRequest(
                engine.encode_chat([{"role": "user", "content": p}]),
                "alpha@1" if i % 3 else "tiny",
                max_tokens=120,
                temperature=(i % 2) * 1.0,
                seed=i,
                grammar=grammar,
                chat=True,
                on_event=on_event(i),
            )
        )
    for _ in range(100):
        assert done.acquire(timeout=120)
    texts = set()
    for i in range(100):
        res = results[i]
        assert not isinstance(res, Exception), res
        assert res.finish_reason == "stop", (i, res.text)
        validate_json(json.loads(res.text), SCHEMA)
        texts.add(res.text)
    assert len(texts) > 20  # the constraint shapes the answer, the model still chooses it


@pytest.mark.slow  # the openai client and llguidance's grammar compiler: ~4 s
def test_response_format_over_the_openai_client(api):
    _, client = api
    r = client.chat.completions.create(
        model="alpha@1",
        messages=[{"role": "user", "content": "a person"}],
        max_tokens=120,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}},
    )
    assert r.choices[0].finish_reason == "stop"
    validate_json(json.loads(r.choices[0].message.content), SCHEMA)
    s = client.chat.completions.create(
        model="alpha@1",
        messages=[{"role": "user", "content": "a person"}],
        max_tokens=120,
        temperature=0,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
    )
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == r.choices[0].message.content
    obj = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_object"},
    )
    text = obj.choices[0].message.content
    assert text.startswith("{")
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_unusable_schemas_are_openai_400s(api):
    _, client = api
    msg = [{"role": "user", "content": "x"}]
    cases = [
        (
            {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "strng"}}},
            "response_format.json_schema.schema",
        ),
        ({"type": "json_schema", "json_schema": {"name": "s", "schema": [1]}}, "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "response_format.json_schema.name"),
        ({"type": "yaml"}, "response_format.type"),
    ]
    for fmt, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=msg, max_tokens=4, response_format=fmt)
        assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error", e.value.body


def test_missing_llguidance_names_the_extra(monkeypatch, served_ws):
    import sys

    from finetrace.decoding import constrain
    from finetrace.errors import DependencyError

    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(DependencyError, match=r"finetrace\[structured\]"):
        constrain.schema_grammar({"type": "object"})
