"""Quantised loading keeps a bf16-stored embedding and output layer at bf16 (widened where used): the same
numbers as transformers' fp32 copy, half the memory; the NF4 weights are the ones transformers makes."""

from __future__ import annotations

from importlib.util import find_spec

import pytest
import torch

from finetrace.models.random_init import write_random_model

# checked, not imported, at collection (importing bitsandbytes takes seconds): the tests that use it import it
pytestmark = pytest.mark.skipif(find_spec("bitsandbytes") is None, reason="needs the quant extra (bitsandbytes)")


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    return write_random_model(
        tmp_path_factory.mktemp("q") / "llama-8m", "llama-8m", dtype="bfloat16", shard_bytes=2 << 20
    )


def _transformers_nf4(folder, spec):
    from transformers import AutoModelForCausalLM

    from finetrace.models.quant import bnb_config

    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, quantization_config=bnb_config(spec), device_map="cpu"
    )


def test_bf16_embedding_is_kept_and_the_logits_equal_an_fp32_copy(bf16_dir):
    from finetrace.models.quant import load_causal_lm, make_spec

    spec = make_spec(4, compute_dtype="float32")  # fp32 compute: the embedding is narrower than it
    ours, ref = load_causal_lm(bf16_dir, quantization=spec), _transformers_nf4(bf16_dir, spec)
    emb = ours.get_input_embeddings().weight
    assert emb.dtype == torch.bfloat16 and emb is ours.get_output_embeddings().weight  # tied, stored once
    assert ref.get_input_embeddings().weight.dtype == torch.float32
    assert ours.model.norm.weight.dtype == torch.float32
    assert torch.equal(ours.model.layers[1].mlp.down_proj.weight.data, ref.model.layers[1].mlp.down_proj.weight.data)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7], [8, 1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    assert a.dtype == torch.float32 and a.shape == (2, 7, 8192)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    mem = sum(p.numel() * p.element_size() for p in ours.parameters())
    assert mem < 0.75 * sum(p.numel() * p.element_size() for p in ref.parameters())


def test_an_fp32_stored_embedding_stays_fp32(tmp_path):
    from finetrace.models.quant import load_causal_lm, make_spec

    folder = write_random_model(tmp_path / "f32", "llama-8m", dtype="float32")
    assert (
        load_causal_lm(folder, quantization=make_spec(4, compute_dtype="float32")).get_input_embeddings().weight.dtype
        == torch.float32
    )


@pytest.mark.parametrize("fn", ["sft", "dpo"])
def test_chunked_losses_with_a_bf16_head_equal_the_widened_reference(fn):
    from finetrace.models import quant
    from finetrace.train.loss import LinearCrossEntropy
    from finetrace.train.preference import TokenLogProbs

    torch.manual_seed(0)
    w = torch.randn(1000, 32).to(torch.bfloat16)
    h = torch.randn(70, 32, requires_grad=True)
    y = torch.randint(0, 1000, (70,))
    old, quant.VOCAB_BLOCK = quant.VOCAB_BLOCK, 300  # several blocks, the last one short
    try:
        if fn == "sft":
            out = LinearCrossEntropy.apply(h, w, None, y, 16)
        else:
            out = TokenLogProbs.apply(h, w, None, y, 16).mul(torch.linspace(-1, 1, 70)).sum()
        (g,) = torch.autograd.grad(out, h)
    finally:
        quant.VOCAB_BLOCK = old
    z = h @ w.float().t()
    ref = (
        torch.nn.functional.cross_entropy(z, y, reduction="sum")
        if fn == "sft"
        else torch.log_softmax(z, -1).gather(1, y[:, None]).squeeze(1).mul(torch.linspace(-1, 1, 70)).sum()
    )
    (g_ref,) = torch.autograd.grad(ref, h)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


LOAD = """
import json, sys
from pathlib import Path
def vm(k):
    return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(k))
import torch, transformers, bitsandbytes  # imported before the baseline is taken
from finetrace.models.quant import load_causal_lm, make_spec
spec = make_spec(4)
before = vm("VmRSS:")
Path("/proc/self/clear_refs").write_text("5")
model = load_causal_lm(Path(sys.argv[1]), quantization=spec)
print(json.dumps({"before": before, "peak": vm("VmHWM:"), "after": vm("VmRSS:"), "file": vm("RssFile:"),
                  "bytes": sum(p.numel() * p.element_size() for p in model.parameters())}), flush=True)
import os; os._exit(0)  # measured and printed: skip the interpreter's teardown (seconds with torch loaded)
"""


@pytest.mark.slow
def test_a_quantised_load_holds_no_mapped_shard(tmp_path):
    """Shards are read tensor by tensor with pread: the load peaks near the quantised model's own size,
    not at the model's mapped bf16 files (1.85x their size with transformers' mmap reads, measured)."""
    import json
    import os
    import subprocess
    import sys

    folder = write_random_model(tmp_path / "llama-100m", "llama-100m", dtype="bfloat16", shard_bytes=64 << 20)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD, str(folder)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["bytes"] < 0.5 * size  # NF4 layers, bf16 embedding
    assert r["peak"] - r["before"] < 1.2 * size, (r, size)
    assert r["after"] - r["before"] < 0.8 * size, (r, size)


def test_auto_compute_dtype_follows_the_cpu(monkeypatch):
    from finetrace import environment
    from finetrace.models.quant import auto_compute_dtype

    assert "fpu" in environment.cpu_flags() or not environment.cpu_flags()  # the real /proc/cpuinfo, when present
    monkeypatch.setattr(environment, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "amx_bf16"}))
    assert (auto_compute_dtype(4), auto_compute_dtype(8), auto_compute_dtype(8, "cuda")) == (
        "bfloat16",
        "float32",
        "bfloat16",
    )
    monkeypatch.setattr(environment, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))  # no native bf16
    assert auto_compute_dtype(4) == "float32" and auto_compute_dtype(4, "cuda") == "bfloat16"
