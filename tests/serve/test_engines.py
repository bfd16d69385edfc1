"""The gateway in front of other engines: llama.cpp through the official client with provenance, the GGUF
LoRA conversion checked against PEFT through llama.cpp itself, parity per engine, a killed engine process,
and vLLM's launch line and attach mode (against the llama.cpp engine, which speaks vLLM's runtime API)."""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import pytest

from finetrace.serve.engines import open_engine
from finetrace.serve.server import BackgroundServer
from finetrace.serve.settings import ServeSettings

from .serve_support import logged_events, make_adapter

pytestmark = pytest.mark.slow  # llama.cpp loads and serves a GGUF per module (~4 s)
llama_cpp = pytest.importorskip("llama_cpp", reason="needs the llamacpp extra: pip install 'finetrace[llamacpp]'")

HELLO = [{"role": "user", "content": "hello world, the contract"}]


def _ranked(ws, name: str, r: int):
    """Adapter ``name@1`` of rank ``r`` (made once per workspace)."""
    from finetrace.errors import NotFoundError

    try:
        return ws.ledger.resolve(f"{name}@1", kind="adapter")
    except NotFoundError:
        return make_adapter(ws, ws.ctx["base"], ws.ctx["tokenizer"], ws.ctx["model_dir"], name, 7, ws.ctx["tmp"], r=r)


@pytest.fixture(scope="module")
def llama_srv(served_ws):
    eng = open_engine(served_ws, "tiny", ["alpha@1", "beta@1"], ServeSettings(log_flush_s=0.05), "llamacpp", threads=1)
    with BackgroundServer(eng) as srv:
        yield srv


def test_gguf_lora_matches_peft_through_llama_cpp(served_ws, tmp_path):
    """Our GGUF LoRA file, applied by llama.cpp per request, gives PEFT's logits; clearing it gives the base's."""
    import ctypes

    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetrace.serve.gguf_export import write_gguf, write_gguf_lora

    base_dir = served_ws.ctx["model_dir"]
    adapter = served_ws.store.materialize(served_ws.ledger.resolve("alpha@1", kind="adapter").digest)
    write_gguf(base_dir, tmp_path / "base.gguf")
    write_gguf_lora(adapter, base_dir, tmp_path / "lora.gguf")
    ids = [5, 17, 100, 200, 33, 7]
    m = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        want_base = m(torch.tensor([ids])).logits[0, -1].numpy()
        want_lora = PeftModel.from_pretrained(m, str(adapter))(torch.tensor([ids])).logits[0, -1].numpy()
    llm = llama_cpp.Llama(str(tmp_path / "base.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=1)

    def last():
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[llm.n_tokens - 1])

    ad = llama_cpp.llama_adapter_lora_init(llm._model.model, str(tmp_path / "lora.gguf").encode())
    assert ad
    assert (
        llama_cpp.llama_set_adapters_lora(
            llm._ctx.ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(ad), 1, (ctypes.c_float * 1)(1.0)
        )
        == 0
    )
    got = last()
    assert np.abs(want_lora - want_base).max() > 0.05  # the adapter changes the logits...
    assert np.abs(got - want_lora).max() < 2e-3  # ...and llama.cpp applies it as PEFT does
    assert llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, None, 0, None) == 0
    assert np.abs(last() - want_base).max() < 2e-3
    llama_cpp.llama_adapter_lora_free(ad)


def test_a_q8_0_gguf_decodes_a_multi_token_prompt_in_the_worker(served_ws, tmp_path):
    """On a CPU with AMX, ggml's AMX buffers crashed the process (SIGSEGV) on any prompt of 2+ tokens of a
    quantised GGUF; the worker opens models without them there. Greedy ids equal the f32 file's mostly."""
    from finetrace.serve.engines.llamacpp_worker import Worker
    from finetrace.serve.gguf_export import write_gguf

    prompt = list(range(5, 45))  # 40 tokens: one multi-token batch
    out = {}
    for qtype in ("q8_0", "f32"):
        path = write_gguf(served_ws.ctx["model_dir"], tmp_path / f"{qtype}.gguf", qtype=qtype)
        worker = Worker(str(path), n_ctx=128, threads=2, served_name="tiny")
        out[qtype] = worker.token_ids({"prompt": prompt, "max_tokens": 12, "temperature": 0})
        worker.close()
    assert len(out["q8_0"]) == len(out["f32"]) > 0
    assert out["q8_0"][:3] == out["f32"][:3]  # 8-bit weights: the same first greedy tokens


def test_gguf_lora_layout_is_llama_cpp_converters(served_ws, tmp_path):
    """Names, shapes and alpha as llama.cpp's convert_lora_to_gguf.py writes them (checked against it, see
    docs/serve.md): lora_a (r, in), lora_b (out, r) with Q/K rows rope-permuted, alpha in adapter.lora.alpha."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    from finetrace.serve.gguf_export import rope_permute, write_gguf_lora

    adapter = served_ws.store.materialize(served_ws.ledger.resolve("alpha@1", kind="adapter").digest)
    path = write_gguf_lora(adapter, served_ws.ctx["model_dir"], tmp_path / "a.gguf")
    rd = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in rd.fields.items() if not k.startswith("GGUF.")}
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora" and kv["adapter.lora.alpha"] == 8.0
    t = {x.name: np.array(x.data) for x in rd.tensors}
    peft = load_file(adapter / "adapter_model.safetensors")
    pre = "base_model.model.model.layers.1."
    assert set(t) == {
        f"blk.{i}.{n}.weight.lora_{ab}"
        for i in (0, 1)
        for ab in "ab"
        for n in ("attn_q", "attn_v", "attn_output", "ffn_up")
    }
    assert np.array_equal(t["blk.1.attn_q.weight.lora_a"], peft[pre + "self_attn.q_proj.lora_A.weight"])
    assert np.array_equal(
        t["blk.1.attn_q.weight.lora_b"], rope_permute(peft[pre + "self_attn.q_proj.lora_B.weight"], 4)
    )
    assert np.array_equal(t["blk.1.attn_v.weight.lora_b"], peft[pre + "self_attn.v_proj.lora_B.weight"])


def test_openai_client_through_gateway_on_llama_cpp(served_ws, llama_srv):
    """Answers with provenance ids; the ids resolve to the same lineage as on the native engine, plus the engine."""
    from finetrace.serve.provenance import resolve

    client = openai.OpenAI(base_url=llama_srv.base_url, api_key="none")
    out = client.chat.completions.create(model="alpha@1", messages=HELLO, max_tokens=12, temperature=0)
    pid = out.model_extra["provenance_id"]
    assert pid.startswith("ftp-") and out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens == len(llama_srv.engine.encode_chat(HELLO))
    stream = client.chat.completions.create(model="beta@1", messages=HELLO, max_tokens=12, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    again = client.chat.completions.create(model="beta@1", messages=HELLO, max_tokens=12, temperature=0)
    assert again.choices[0].message.content == text.strip()  # streamed == whole, adapters switched between
    doc = httpx.get(f"{llama_srv.url}/v1/provenance/{pid}").json()
    dep = doc["deployment"]["config"]["engine"]
    assert dep["name"] == "llamacpp" and dep["version"] == f"llama-cpp-python {llama_cpp.__version__}"
    assert "--lora" in dep["args"] and dep["files"]["alpha@1"]["gguf_sha256"].startswith("sha256:")
    # the same lineage as an answer from the native engine
    native = open_engine(served_ws, "tiny", ["alpha@1"], ServeSettings(log_flush_s=0.05))
    native.start()
    try:
        nres = native.generate("alpha@1", messages=HELLO, max_tokens=12)
        native.request_log.flush()
    finally:
        native.stop()
    ndoc = resolve(served_ws, nres.provenance_id)
    for key in ("adapter", "training_run", "datasets"):
        assert doc[key] == ndoc[key], key
    assert ndoc["deployment"]["config"].get("engine") is None
    from finetrace.serve.provenance import render

    assert f"engine      llamacpp llama-cpp-python {llama_cpp.__version__} launch" in render(doc)
    assert "engine      native" in render(ndoc)
    ev = [e for e in logged_events(served_ws, llama_srv.engine.deployment) if e["provenance_id"] == pid]
    assert len(ev) == 1 and ev[0]["adapter"] == doc["adapter"]["digest"]


@pytest.mark.slow
def test_killed_engine_errors_the_stream_reports_and_restarts(served_ws, llama_srv):
    client = openai.OpenAI(base_url=llama_srv.base_url, api_key="none", max_retries=0)
    eng = llama_srv.engine
    proc = eng.backend.proc.proc
    os.kill(proc.pid, signal.SIGSTOP)  # frozen: the request is in flight when the process dies
    stream = client.chat.completions.create(model="alpha@1", messages=HELLO, max_tokens=40, stream=True)
    it = iter(stream)
    first = next(it)  # the role chunk: the client is mid-stream
    assert first.choices[0].delta.role == "assistant"
    os.kill(proc.pid, signal.SIGKILL)
    with pytest.raises(openai.APIError):
        for _ in it:
            pass
    health = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = httpx.get(llama_srv.url + "/health").json()
        if health["engine"]["restarts"] >= 1 and health["status"] == "ok":
            break
        time.sleep(0.1)
    assert health["engine"]["last_exit"]["returncode"] == -signal.SIGKILL and health["engine"]["restarts"] >= 1
    out = client.chat.completions.create(model="alpha@1", messages=HELLO, max_tokens=8, temperature=0)
    assert out.choices[0].message.content is not None and out.model_extra["provenance_id"]
    eng.request_log.flush()
    events = logged_events(served_ws, eng.deployment)
    failed = [e for e in events if e["finish_reason"] == "error"]
    assert (
        failed
        and failed[-1]["delivered"] is False
        and failed[-1]["output_sha256"] == ("sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    )  # nothing returned, nothing recorded
    kinds = [e.type for e in served_ws.ledger.entries() if e.type.startswith("deploy.engine")]
    assert "deploy.engine_exited" in kinds and "deploy.engine_restarted" in kinds


def test_vllm_launch_line_for_three_ranks(served_ws):
    """`vllm serve` flags as vLLM documents them: --enable-lora, --max-loras = count, --max-lora-rank = the real
    maximum rounded up to a value vLLM accepts, --lora-modules name=path of the materialised, re-hashed folders."""
    from finetrace.serve.engines.vllm import (
        VLLM_MAX_LORA_RANKS,
        adapter_rank,
        vllm_command,
    )
    from finetrace.serve.registry import check_adapter

    ws, base = served_ws, served_ws.ctx["base"]
    for name, r in (("r4", 4), ("r8", 8), ("r16", 16)):
        _ranked(ws, name, r)
    from finetrace.models.identity import text_identity

    ident = text_identity(ws.ctx["tokenizer"])
    infos = [check_adapter(ws, ref, base, ident, False) for ref in ("r4@1", "r8@1", "r16@1")]
    assert [adapter_rank(i.path) for i in infos] == [4, 8, 16]
    argv = vllm_command("/models/tiny", "tiny", [(i.ref, i.path) for i in infos], 8123)
    assert argv[:3] == ["vllm", "serve", "/models/tiny"]
    flags = dict(zip(argv[3:9:2], argv[4:9:2]))
    assert flags == {"--served-model-name": "tiny", "--host": "127.0.0.1", "--port": "8123"}
    assert argv[9:11] == ["--generation-config", "vllm"]
    assert argv[11] == "--enable-lora"
    assert argv[12:16] == ["--max-loras", "3", "--max-lora-rank", "16"] and 16 in VLLM_MAX_LORA_RANKS
    assert argv[16] == "--lora-modules" and argv[17:] == [f"{i.ref}={i.path}" for i in infos]
    assert all((i.path / "adapter_config.json").is_file() for i in infos)
    # ranks vLLM does not list are rounded up (4 -> 8), never down
    assert vllm_command("/m", "m", [(infos[0].ref, infos[0].path)], 1)[14:16] == ["--max-lora-rank", "8"]


def test_vllm_attach_loads_adapters_through_the_runtime_api(served_ws, llama_srv):
    """--engine vllm --upstream URL: adapters loaded with /v1/load_lora_adapter on a real OpenAI-compatible
    engine that is not vLLM (the llama.cpp worker above), answers forwarded, engine recorded as attached."""
    _ranked(served_ws, "r8", 8)
    upstream = llama_srv.engine.backend.url
    eng = open_engine(served_ws, "tiny", ["r8@1"], ServeSettings(log_flush_s=0.05), "vllm", upstream=upstream)
    with BackgroundServer(eng) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="none")
        out = client.completions.create(model="r8@1", prompt="the supplier shall", max_tokens=6, temperature=0)
        assert out.model_extra["provenance_id"].startswith("ftp-")
        names = [m["id"] for m in httpx.get(upstream + "/v1/models").json()["data"]]
        assert "r8@1" in names
        dep = served_ws.ledger.get_run(eng.deployment).to_dict()["config"]["engine"]
        assert dep["name"] == "vllm" and dep["mode"] == "attach" and dep["upstream"] == upstream
        assert dep["version"] == llama_cpp.__version__ and dep["real_max_lora_rank"] == 8


@pytest.mark.slow
def test_parity_on_llama_cpp_is_recorded_as_a_number(served_ws):
    """The eval set replayed through llama.cpp: an agreement rate recorded as a `parity` run (engine llamacpp)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from finetrace.evaluate.runner import evaluate
    from finetrace.serve.parity import latest_parity, parity

    tmp = served_ws.ctx["tmp"]
    folder = tmp / "ds-llama-parity"
    folder.mkdir()
    rows = [
        {"prompt": f"the supplier {w} question {i}", "completion": "x"}
        for i, w in enumerate(["contract", "invoice", "data", "billing", "audit", "river"] * 2)
    ]
    (folder / "dataset.json").write_text(
        json.dumps({"schema": "completion", "columns": ["completion", "prompt"], "counts": {"test": len(rows)}})
    )
    pq.write_table(pa.Table.from_pylist(rows), folder / "test.parquet")
    ds = served_ws.ledger.add_artifact("dataset", served_ws.store.put_dir(folder), name="llama-parity")
    suite = tmp / "llama-suite.yaml"
    suite.write_text(
        "bias: {enabled: false}\nforgetting: {enabled: false}\nbootstrap: {samples: 10}\n"
        "max_new_tokens: 8\nbatch_size: 8\n"
    )
    evaluate(served_ws, "tiny", ds.ref, adapter_ref="beta@1", suite=suite, name="llama-parity-eval")
    res = parity(served_ws, "beta@1", engine="llamacpp")
    assert res.engine == "llamacpp" and res.n == len(rows)
    assert 0.0 <= res.agreement <= 1.0 and res.agreeing + len(res.differing) == res.n
    assert res.agreement >= 0.5, res.differing  # f32 GGUF of the same weights: differences are float ties only
    rec = latest_parity(served_ws, res.adapter)
    assert rec["engine"] == "llamacpp" and rec["agreement"] == res.agreement and rec["run_id"] == res.run_id
    assert rec["engine_version"] == f"llama-cpp-python {llama_cpp.__version__}"
    print(f"llama.cpp parity: {res.agreeing}/{res.n} = {res.agreement:.3f}")


def test_hot_load_and_unload_on_llama_cpp(served_ws, llama_srv):
    """An adapter loaded while serving is converted, admitted, served, kept across restarts; unloaded, it is a 404."""
    _ranked(served_ws, "r4", 4)
    eng = llama_srv.engine
    info = eng.load_adapter("r4@1")
    client = openai.OpenAI(base_url=llama_srv.base_url, api_key="none", max_retries=0)
    out = client.completions.create(model="r4@1", prompt="the customer shall", max_tokens=4, temperature=0)
    assert out.model_extra["provenance_id"].startswith("ftp-")
    spec = f"r4@1={eng.backend.files['r4@1']['gguf']}"
    assert spec in eng.backend.process.argv  # a restart brings it back
    assert eng.backend.files["r4@1"]["adapter"] == info.digest
    eng.unload_adapter("r4@1")
    assert spec not in eng.backend.process.argv
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="r4@1", prompt="the customer shall", max_tokens=4)
