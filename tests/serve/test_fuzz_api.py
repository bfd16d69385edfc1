"""Fuzzing the HTTP API over its own OpenAPI schema (hypothesis, derandomised: the same cases on every run).

Bodies are drawn from each endpoint's request schema, with any value swapped now and then for junk of
any JSON type (huge integers, NaN, lone surrogates, nesting, wrong types). Every answer must be JSON in
the OpenAI shape (or a well-formed SSE stream), never a 500, never a traceback, and within a time bound.
"""

from __future__ import annotations

import json
import urllib.parse

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetrace.serve.engine import Engine
from finetrace.serve.server import BackgroundServer
from finetrace.serve.settings import ServeSettings

pytestmark = pytest.mark.slow

FUZZ = settings(
    derandomize=True, database=None, deadline=None, max_examples=120, suppress_health_check=list(HealthCheck)
)
TIMEOUT_S = 20  # one request; a hang fails the test instead of stalling it
HINTS = {  # property name -> values that reach deeper than random text
    "model": st.sampled_from(["tiny", "alpha@1", "alpha", "tiny", "nope@3"]),
    "role": st.sampled_from(["user", "system", "assistant", "developer", "tool"]),
    "type": st.sampled_from(["text", "image_url"]),
    "prompt": st.text(min_size=1, max_size=40),
    "content": st.text(min_size=1, max_size=40),
    "n": st.just(1),
    "top_p": st.floats(0.05, 1),
    "stop": st.text(min_size=1, max_size=3),
}
ALWAYS = {"model", "prompt", "messages", "role"}  # drawn every time (a body without them is one 400)
ODD_TEXT = st.lists(  # pieces of lone surrogates, control characters and ordinary text (a union of character
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2)  # strategies would drop the surrogates)
    | st.text(st.characters(categories=["Cc"]), min_size=1, max_size=3)
    | st.text(max_size=8),
    min_size=1,
    max_size=5,
).map("".join)
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-(2**80), 2**80) | st.floats() | ODD_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ODD_TEXT, inner, max_size=4),
    max_leaves=12,
)


def _mostly(usual: st.SearchStrategy, odd: st.SearchStrategy) -> st.SearchStrategy:
    """``usual`` seven times in eight, ``odd`` otherwise (so that whole bodies are often valid)."""
    return st.integers(0, 7).flatmap(lambda k: odd if k == 0 else usual)


TEXT = _mostly(st.text(max_size=40), ODD_TEXT)


def from_schema(schema: dict, spec: dict, name: str = "", junk: bool = True) -> st.SearchStrategy:
    """A strategy for values valid under (a practical subset of) JSON Schema; with ``junk``, any value is
    now and then swapped for junk, and strings for odd text."""
    valid = _valid(schema, spec, name, junk)
    return _mostly(valid, JUNK) if name and junk else valid


def _valid(schema: dict, spec: dict, name: str, junk: bool) -> st.SearchStrategy:
    if "$ref" in schema:
        return _valid(spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]], spec, name, junk)
    if "anyOf" in schema:
        return st.one_of([_valid(s, spec, name, junk) for s in schema["anyOf"]])
    if name in HINTS and schema.get("type") in ("string", "integer", "number"):
        return _mostly(HINTS[name], TEXT | ODD_TEXT) if junk else HINTS[name]
    kind = schema.get("type")
    if kind == "string":
        return TEXT if junk else st.text(max_size=40)
    if kind == "integer":
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if not junk:
            return st.integers(1, 8)
        return _mostly(
            st.integers(1, 8), st.integers(int(lo) if lo is not None else None, int(hi) if hi is not None else None)
        )
    if kind == "number":
        return _mostly(st.floats(0, 1), st.floats()) if junk else st.floats(0, 1)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), spec, name + "[]", junk), max_size=3)
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = {
            k: from_schema(v, spec, k, junk) for k, v in props.items() if k in schema.get("required", []) or k in ALWAYS
        }
        optional = {k: from_schema(v, spec, k, junk) for k, v in props.items() if k not in required}
        if not props:
            return st.dictionaries(TEXT, JUNK, max_size=3) if junk else st.just({})
        return st.fixed_dictionaries(required, optional=optional)
    return JUNK


@pytest.fixture(scope="module")
def api(served_ws):
    cfg = ServeSettings(max_batch=8, max_tokens_limit=8, default_max_tokens=4, drain_s=1)
    eng = Engine(served_ws, "tiny", ["alpha@1"], cfg)
    with BackgroundServer(eng, cfg) as srv:
        spec = httpx.get(srv.url + "/openapi.json").json()
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT_S) as client:
            yield client, spec


def _check(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    assert "Traceback" not in r.text
    if 300 <= r.status_code < 400:  # a trailing slash is redirected to the route without it
        assert r.headers["location"]
        return
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in r.text.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                json.loads(line[6:])
        return
    doc = r.json()
    if r.status_code >= 400:
        assert set(doc["error"]) == {"message", "type", "param", "code"}, doc


def _body(spec: dict, path: str, junk: bool = True) -> st.SearchStrategy:
    schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return from_schema(schema, spec, junk=junk)


def _dumps(value) -> str:
    return json.dumps(value, allow_nan=True)  # NaN/Infinity are what a sloppy client sends too


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_fuzz_generation_endpoints(api, path):
    client, spec = api

    @FUZZ
    @given(body=_body(spec, path) | JUNK)
    def run(body):
        _check(client.post(path, content=_dumps(body), headers={"content-type": "application/json"}))

    run()


def test_fuzz_path_parameters_and_raw_bodies(api):
    client, spec = api
    assert {"/v1/models/{model}", "/v1/provenance/{provenance_id}"} <= set(spec["paths"])

    @FUZZ
    @given(text=TEXT, raw=st.binary(max_size=64))
    def run(text, raw):
        quoted = urllib.parse.quote(text.encode("utf-8", "surrogatepass"), safe="")
        for url in (f"/v1/models/{quoted}", f"/v1/provenance/{quoted}"):
            _check(client.get(url))
        _check(client.post("/v1/completions", content=raw, headers={"content-type": "application/json"}))

    run()


def test_the_strategies_reach_the_engine(api):
    """Guard against a fuzzer that only ever produces 400s: valid bodies are generated and answered."""
    client, spec = api
    seen = []

    @settings(FUZZ, max_examples=40)
    @given(body=_body(spec, "/v1/completions", junk=False))
    def run(body):
        r = client.post("/v1/completions", content=_dumps(body), headers={"content-type": "application/json"})
        _check(r)
        seen.append(r.status_code)

    run()
    assert seen.count(200) >= 8 and len(set(seen)) >= 2, seen
