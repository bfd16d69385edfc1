"""Sharded safetensors folders (index + shards, as on the Hub): added once, loaded shard by shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from finetrace.models import add_model, model_path
from finetrace.models.random_init import parameter_count, write_random_model

LOAD = """
import json, sys
from pathlib import Path
def vm(k):
    return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(k))
import torch, transformers  # imported before the baseline is taken
from finetrace.models.quant import load_causal_lm
before = vm("VmRSS:")
Path("/proc/self/clear_refs").write_text("5")
model = load_causal_lm(Path(sys.argv[1]), "float32")
print(json.dumps({"before": before, "peak": vm("VmHWM:"),
                  "bytes": sum(p.numel() * p.element_size() for p in model.parameters())}), flush=True)
import os; os._exit(0)  # measured and printed: skip the interpreter's teardown (seconds with torch loaded)
"""


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    return write_random_model(
        tmp_path_factory.mktemp("sharded") / "llama-60m", "llama-60m", dtype="float32", shard_bytes=24 << 20
    )


@pytest.mark.slow
def test_sharded_folder_is_added_once_with_every_shard(workspace, sharded_dir):
    shards = sorted(p.name for p in sharded_dir.glob("model-*.safetensors"))
    assert len(shards) >= 4 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    art = add_model(workspace, sharded_dir, name="sharded")
    assert art.metadata["parameters"] == parameter_count("llama-60m")
    assert art.metadata["architecture"] == "LlamaForCausalLM" and art.metadata["hidden_size"] == 512
    stored, _ = model_path(workspace, "sharded")
    assert {p.name for p in stored.glob("*.safetensors")} == set(shards)
    assert (stored / "model.safetensors.index.json").is_file()
    assert add_model(workspace, sharded_dir, name="sharded").digest == art.digest  # stored once
    assert len(workspace.ledger.artifacts("base_model")) == 1


@pytest.mark.slow
def test_sharded_load_peaks_under_1_3x_one_copy(sharded_dir):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD, str(sharded_dir)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["bytes"] == 4 * parameter_count("llama-60m")
    growth = r["peak"] - r["before"]
    assert growth < 1.3 * r["bytes"], (growth / r["bytes"], r)
