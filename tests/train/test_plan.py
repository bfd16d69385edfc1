"""The memory plan: estimated before any weight loads, within 25% of the measured peak, refused with the
cheapest change that fits, printed by ``finetrace train CONFIG --plan``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetrace.train import memory_plan, train
from finetrace.train.plan import MemoryPlanError, ModelShape, Plan, cheapest_fix, estimate, settings_of

from .train_support import make_config

SIZES = ("llama-8m", "llama-60m", "llama-100m")


def long_rows(n: int) -> list[dict]:
    from .conftest import toy_rows

    return [{"prompt": r["prompt"] * 6, "completion": r["completion"] * 6} for r in toy_rows(n)]


@pytest.fixture(scope="module")
def sized(tmp_path_factory):
    """A workspace holding random models of three sizes (bf16 shards) and a dataset of ~100-token rows."""
    from finetrace.models import add_model
    from finetrace.models.random_init import write_random_model
    from finetrace.workspace import Workspace

    from .conftest import write_dataset

    root = tmp_path_factory.mktemp("sized")
    workspace = Workspace.init(root / "ws")
    for shape in SIZES:
        add_model(
            workspace, write_random_model(root / shape, shape, dtype="bfloat16", shard_bytes=64 << 20), name=shape
        )
    folder = write_dataset(root / "ds", {"train": long_rows(48)})
    workspace.ledger.add_artifact("dataset", workspace.store.put_dir(folder), name="long")
    yield workspace
    workspace.close()


@pytest.fixture(scope="module")
def measured(sized) -> dict[str, list[dict]]:
    """{method: one row per size}: every run of both methods from one child process (one fork per run)."""
    from importlib.util import find_spec

    methods = ["lora"] + (["qlora"] if find_spec("bitsandbytes") else [])
    child = Path(__file__).with_name("plan_child.py")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(child), str(sized.root), ",".join(methods), *SIZES],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {m: [r for r in rows if r["method"] == m] for m in methods}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_plan_is_within_25_percent_of_the_measured_peak(measured, method):
    if method not in measured:
        pytest.skip("needs the quant extra (bitsandbytes)")
    rows = measured[method]
    assert [r["base"] for r in rows] == list(SIZES)
    for r in rows:
        assert 0.75 <= r["estimate"] / r["measured"] <= 1.25, rows
    assert rows[-1]["measured"] > rows[0]["measured"] + 150  # the sizes differ in memory, not just runtime


def test_a_plan_that_cannot_fit_is_refused_before_any_weight_loads(tiny_setup, monkeypatch):
    import finetrace.train.loop as loop

    ws, _, _ = tiny_setup
    loaded = []
    monkeypatch.setattr(loop, "load_weights", lambda *a, **k: loaded.append(a))
    monkeypatch.setenv("FINETRACE_MEMORY_LIMIT_MB", "200")
    with pytest.raises(MemoryPlanError) as err:
        train(ws, make_config(), progress=False)
    msg = str(err.value)
    assert "needs an estimated" in msg and "200 MiB are available" in msg and "nothing was loaded" in msg
    assert err.value.hint and "smaller model or a machine with more memory" in err.value.hint
    assert loaded == [] and ws.ledger.runs("train") == []


def llama_1b_shape() -> ModelShape:
    from finetrace.models.random_init import SHAPES

    c = SHAPES["llama-3.2-1b"]
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    per_layer = [
        ("q_proj", h, h),
        ("k_proj", kv, h),
        ("v_proj", kv, h),
        ("o_proj", h, h),
        ("gate_proj", i, h),
        ("up_proj", i, h),
        ("down_proj", h, i),
    ]
    linear = [(f"model.layers.{n}.{name}", o, k) for n in range(c["num_hidden_layers"]) for name, o, k in per_layer]
    return ModelShape(
        linear,
        c["vocab_size"] * h + (2 * c["num_hidden_layers"] + 1) * h,
        1 << 30,
        2,
        h,
        i,
        c["num_hidden_layers"],
        c["vocab_size"],
    )


@pytest.mark.parametrize(
    "tokens,avail,want",
    [
        (4096, 9000, "micro_batch_tokens"),  # activations dominate: a smaller budget suffices
        (256, 6300, "gradient_checkpointing"),  # the budget is small already; checkpointing fits
        (1024, 5600, "quantization.bits: 8"),  # an 8-bit base (with checkpointing) fits
        (1024, 2450, "method: qlora"),  # only a 4-bit base (with checkpointing) fits
        (1024, 2200, "parallel: fsdp"),  # only sharding across processes
    ],
)
def test_cheapest_change_that_fits(tiny_setup, tokens, avail, want, monkeypatch):
    from finetrace import environment

    monkeypatch.setattr(environment, "cpu_flags", lambda: frozenset({"avx2"}))  # qlora computes in fp32 here
    shape = llama_1b_shape()
    s = settings_of(make_config(), tokens, 1)
    assert Plan(estimate(shape, s, "cpu"), "cpu", avail).fits is False
    fix = cheapest_fix(shape, s, "cpu", avail)
    assert fix.startswith(want), fix
    est = float(fix.split("estimated")[1].split("MiB")[0].replace("peak", "").replace(",", ""))
    assert est <= avail


def test_cli_plan_prints_the_plan_and_records_nothing(tiny_setup, tmp_path, capsys):
    from finetrace.cli import main

    ws, _, _ = tiny_setup
    cfg = tmp_path / "t.yaml"
    cfg.write_text("base_model: tiny\ndataset: toy\noutput_name: planned\nmethod: qlora\n")
    assert main(["-w", str(ws.root), "train", str(cfg), "--plan", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["bits"] == 4 and plan["peak_mb"] > plan["parts_mb"]["runtime"]
    assert set(plan["parts_mb"]) == {"runtime", "weights", "adapter", "activations", "loss", "loading"}
    assert ws.ledger.runs("train") == []
    assert (
        memory_plan(ws, make_config(method="qlora")).parts["weights"] < memory_plan(ws, make_config()).parts["weights"]
    )


def test_a_qlora_suggestion_is_estimated_at_the_compute_dtype_auto_picks(tiny_setup, monkeypatch):
    from finetrace import environment

    shape, s = llama_1b_shape(), settings_of(make_config(), 1024, 1)

    def suggested(flags) -> float:
        monkeypatch.setattr(environment, "cpu_flags", lambda: frozenset(flags))
        fix = cheapest_fix(shape, s, "cpu", 2450)
        assert fix.startswith("method: qlora"), fix
        return float(fix.split("estimated peak ")[1].split(" MiB")[0].replace(",", ""))

    # bf16 activations and dequantised weights on a CPU with AMX: a smaller estimate than in fp32
    assert suggested({"avx2", "amx_bf16"}) < 0.9 * suggested({"avx2"})
