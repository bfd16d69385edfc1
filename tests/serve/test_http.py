"""Over loopback with the official `openai` client: a real uvicorn server on a free 127.0.0.1 port."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from finetrace.ledger.clearance import record_override, record_verdict
from finetrace.serve.engine import Engine
from finetrace.serve.server import BackgroundServer
from finetrace.serve.settings import ServeSettings

KEY, ADMIN = "test-key-1", "admin-key-1"
MSG = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(served_ws):
    settings = ServeSettings(api_keys=["other-key", KEY], admin_key=ADMIN, max_batch=8)
    with BackgroundServer(Engine(served_ws, "tiny", ["alpha@1", "beta@1"], settings), settings) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)


def test_models_list(served_ws, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny", "alpha@1", "beta@1"]
    beta = served_ws.ledger.resolve("beta@1")
    assert client.models.retrieve("beta").id == "beta@1"
    assert client.models.retrieve("beta@1").model_extra["digest"] == beta.digest
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gamma@9")


def test_chat_completion_stream_and_provenance_header(server, client):
    r = client.chat.completions.create(model="alpha@1", messages=MSG, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.model == "alpha@1"
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    pid = r.model_extra["provenance_id"]
    raw = client.chat.completions.with_raw_response.create(model="alpha@1", messages=MSG, max_tokens=8, temperature=0)
    assert raw.headers["x-finetrace-provenance"] == raw.parse().model_extra["provenance_id"] != pid
    assert raw.parse().choices[0].message.content == r.choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model="alpha@1",
            messages=MSG,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8


def test_text_completion_and_stream(client):
    r = client.completions.create(model="beta@1", prompt="The supplier shall", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.usage.prompt_tokens > 0
    parts = list(
        client.completions.create(model="beta@1", prompt="The supplier shall", max_tokens=6, temperature=0, stream=True)
    )
    assert "".join(p.choices[0].text for p in parts) == r.choices[0].text
    base = client.completions.create(model="tiny", prompt="The supplier shall", max_tokens=6, temperature=0)
    assert base.choices[0].text != r.choices[0].text


def test_errors_have_openai_shape(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=MSG)
    assert e.value.body["code"] == "model_not_found"
    for bad in ({"temperature": 3}, {"max_tokens": 0}, {"top_p": 0}, {"n": 0}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=MSG, **bad)
        assert e.value.body["type"] == "invalid_request_error" and e.value.body["param"] == next(iter(bad))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])
    r = httpx.post(
        server.base_url + "/chat/completions", json={"messages": MSG}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = httpx.get(server.base_url + "/no-such-route", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_auth(server):
    anon = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anon.models.list()
    assert httpx.post(server.base_url + "/completions", json={"model": "tiny", "prompt": "x"}).status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    # the admin endpoint wants the admin key, not an API key
    assert (
        httpx.post(
            server.url + "/admin/adapters", json={"adapter": "alpha@1"}, headers={"Authorization": f"Bearer {KEY}"}
        ).status_code
        == 401
    )


def test_metrics_after_traffic(server, client):
    client.completions.create(model="alpha@1", prompt="hello", max_tokens=2, temperature=0)
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'finetrace_requests_total{model="alpha@1",status="length"}' in text
    assert 'finetrace_request_latency_seconds_bucket{model="alpha@1",le="+Inf"}' in text
    assert "# TYPE finetrace_request_latency_seconds histogram" in text


def test_burst_of_two_adapters_and_base_equals_each_alone(client):
    prompts = ["hello", "The supplier shall deliver", "Question: What is the capital of France? Answer:"]
    jobs = [(m, p) for m in ("tiny", "alpha@1", "beta@1") for p in prompts]
    got: dict = {}
    barrier = threading.Barrier(len(jobs))

    def run(m, p):
        barrier.wait()
        got[(m, p)] = client.completions.create(model=m, prompt=p, max_tokens=10, temperature=0).choices[0].text

    threads = [threading.Thread(target=run, args=j) for j in jobs]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for m, p in jobs:
        alone = client.completions.create(model=m, prompt=p, max_tokens=10, temperature=0).choices[0].text
        assert got[(m, p)] == alone, (m, p)
    assert len({got[(m, "hello")] for m in ("tiny", "alpha@1", "beta@1")}) == 3


def test_provenance_resolves(served_ws, server, client, capsys):
    r = client.chat.completions.create(model="beta@1", messages=MSG, max_tokens=4, temperature=0)
    pid = r.model_extra["provenance_id"]
    doc = httpx.get(f"{server.base_url}/provenance/{pid}", headers={"Authorization": f"Bearer {KEY}"}).json()
    beta = served_ws.ledger.resolve("beta@1")
    train = served_ws.ledger.get_run(beta.run_id)
    assert doc["adapter"]["digest"] == beta.digest
    assert doc["training_run"]["id"] == train.id and doc["training_run"]["kind"] == "train"
    assert [d["digest"] for d in doc["datasets"]] == [d for d in train.inputs if d != doc["base_model"]["digest"]]
    assert doc["datasets"][0]["datasheet"]["title"] == "beta data"
    assert doc["deployment"]["kind"] == "deploy" and beta.digest in doc["deployment"]["inputs"]
    assert doc["evaluation"]["status"] == "unevaluated"
    assert doc["request"]["completion_tokens"] == 4 and doc["request"]["model"] == "beta@1"
    # the same through the CLI, from another workspace handle
    from finetrace.cli import main

    assert main(["--workspace", str(served_ws.root), "provenance", pid, "--json"]) == 0
    cli_doc = json.loads(capsys.readouterr().out)
    assert cli_doc["training_run"]["id"] == train.id and cli_doc["adapter"]["digest"] == beta.digest
    assert (
        httpx.get(f"{server.base_url}/provenance/ftp-nope", headers={"Authorization": f"Bearer {KEY}"}).status_code
        == 404
    )


def test_failed_gates_refused_until_override(served_ws, server, client):
    from .serve_support import make_adapter

    c = served_ws.ctx
    art = make_adapter(served_ws, c["base"], c["tokenizer"], c["model_dir"], "risky", 11, c["tmp"])
    record_verdict(
        served_ws.ledger,
        art.digest,
        None,
        False,
        [{"name": "bias_gap", "value": 0.3, "threshold": 0.1, "op": "<=", "passed": False}],
    )
    admin = {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.post(server.url + "/admin/adapters", json={"adapter": "risky@1"}, headers=admin, timeout=60)
    assert r.status_code == 403 and "bias_gap" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="risky@1", prompt="hello", max_tokens=2)
    record_override(served_ws.ledger, art.digest, by="Grace Hopper", reason="bias gap reviewed")
    r = httpx.post(server.url + "/admin/adapters", json={"adapter": "risky@1"}, headers=admin, timeout=60)
    assert r.status_code == 201 and r.json()["clearance"] == "overridden"
    out = client.completions.create(model="risky@1", prompt="hello", max_tokens=2, temperature=0)
    assert out.usage.completion_tokens == 2
    doc = httpx.get(
        f"{server.base_url}/provenance/{out.model_extra['provenance_id']}", headers={"Authorization": f"Bearer {KEY}"}
    ).json()
    assert doc["approvals"][0]["type"] == "gate.override" and doc["approvals"][0]["by"] == "Grace Hopper"
    r = httpx.delete(server.url + "/admin/adapters/risky@1", headers=admin, timeout=60)
    assert r.status_code == 200
    assert "risky@1" not in [m.id for m in client.models.list().data]


def test_overload_429_and_nothing_lost(served_ws):
    """The scheduler is held while 16 requests arrive: exactly max_queue are accepted, the rest get 429;
    once released, every accepted request completes in full and is in the ledger."""
    import time
    from concurrent.futures import Future

    settings = ServeSettings(max_queue=4, max_batch=2)
    eng = Engine(served_ws, "tiny", ["alpha@1"], settings)
    n = 16
    outcomes: list = [None] * n
    hold = threading.Event()
    with BackgroundServer(eng, settings) as srv:
        eng._controls.put((lambda: hold.wait(60), Future()))  # the scheduler runs it next, and waits
        cl = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=120)

        def run(i):
            try:
                outcomes[i] = cl.completions.create(
                    model=["tiny", "alpha@1"][i % 2], prompt="hello", max_tokens=20, temperature=0
                )
            except openai.RateLimitError as exc:
                outcomes[i] = exc

        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        [t.start() for t in threads]
        deadline = time.monotonic() + 60
        while sum(isinstance(o, Exception) for o in outcomes) < n - 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.stats()["queued"] == 4
        hold.set()
        [t.join() for t in threads]
        deployment = eng.deployment
    ok = [o for o in outcomes if o is not None and not isinstance(o, Exception)]
    limited = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    assert len(ok) == 4 and len(limited) == n - 4
    assert limited[0].body["code"] == "queue_full" and limited[0].body["type"] == "rate_limit_error"
    assert all(o.usage.completion_tokens == 20 and o.choices[0].finish_reason == "length" for o in ok)
    logged = {
        e.data["provenance_id"]
        for e in served_ws.ledger.entries(type="serve.request")
        if e.data["deployment"] == deployment
    }
    assert logged == {o.model_extra["provenance_id"] for o in ok}
    assert served_ws.ledger.get_run(deployment).status == "succeeded"
    assert served_ws.ledger.get_run(deployment).metrics["rejected"] == n - 4


def test_graceful_shutdown_finishes_in_flight(served_ws):
    import time

    settings = ServeSettings(max_batch=4)
    eng = Engine(served_ws, "tiny", ["beta@1"], settings)
    srv = BackgroundServer(eng, settings).start()
    cl = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=120)
    results: list = []

    def run(i):
        results.append(cl.completions.create(model="beta@1", prompt=f"hello {i}", max_tokens=200, temperature=0))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    [t.start() for t in threads]
    deadline = time.monotonic() + 30
    while eng.stats()["active"] < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    deployment = eng.deployment
    srv.stop()  # while the three are decoding
    [t.join() for t in threads]
    assert len(results) == 3 and all(r.usage.completion_tokens == 200 for r in results)
    logged = [e for e in served_ws.ledger.entries(type="serve.request") if e.data["deployment"] == deployment]
    assert len(logged) == 3
    assert served_ws.ledger.get_run(deployment).status == "succeeded"


def _prefix_hits(server) -> float:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("finetrace_prefix_cache_hit_tokens ")))


def test_prompts_that_start_alike_reuse_the_cached_prefix_and_answer_the_same(server, client):
    system = {"role": "system", "content": "You review supply contracts for a careful buyer; answer in one line."}

    def ask(text):
        msgs = [system, {"role": "user", "content": text}]
        r = client.chat.completions.create(model="alpha@1", messages=msgs, max_tokens=6, temperature=0)
        return r.choices[0].message.content

    before = _prefix_hits(server)
    first = ask("Who pays for delivery?")  # read whole, then kept
    other = ask("When may the buyer end the contract?")  # reads only what follows the shared system turn
    mid = _prefix_hits(server)
    assert mid - before >= 15
    assert ask("Who pays for delivery?") == first  # read from the cache: the same answer
    assert ask("When may the buyer end the contract?") == other
    assert _prefix_hits(server) > mid
