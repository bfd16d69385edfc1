"""``parallel: fsdp`` under ``torchrun --nproc_per_node=2`` (gloo): FSDP2 shards base, adapter and optimiser
state, trains the adapter of one process at the same global batch, records one run, resumes after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from finetrace.errors import NotFoundError
from finetrace.train import load_config, train

# grad_accum 3 over 2 processes: one process makes a weight-0 pass in every step (FSDP needs equal passes)
CONFIG = (
    "base_model: tiny\ndataset: toy\noutput_name: {name}\nparallel: fsdp\nbatch_size: 4\ngrad_accum: 3\n"
    "max_steps: {steps}\nlr: 1.0e-2\neps: 1.0e-3\ncheckpoint_every: 1\neval_every: 5\nseed: 2\n"
)


def torchrun(ws, tmp_path, cfg_file, *extra, wait=True):
    script = tmp_path / "cli.py"
    script.write_text("import sys\nfrom finetrace.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        "-w",
        str(ws.root),
        "train",
        str(cfg_file),
        "--no-progress",
        *extra,
    ]
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def failure(proc) -> str:
    lines = proc.stderr.splitlines()
    said = [ln for ln in lines if "rror" in ln or "hint" in ln.lower()]
    return "\n".join(said[-20:]) + "\n" + "\n".join(lines[-30:])


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    from pathlib import Path

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def adapter(ws, art):
    return load_file(ws.store.materialize(art.digest) / "adapter_model.safetensors")


@pytest.mark.slow
def test_two_process_fsdp_equals_one_process_and_resumes_after_sigkill(tiny_setup, tmp_path):
    from .test_resume import wait_for_step

    ws, _, _ = tiny_setup
    steps = 10
    (tmp_path / "fsdp.yaml").write_text(CONFIG.format(name="fsdp-lora", steps=steps))
    proc = torchrun(ws, tmp_path, tmp_path / "fsdp.yaml")
    assert proc.returncode == 0, failure(proc)
    runs = ws.ledger.runs("train")
    assert len(runs) == 1 and runs[0].environment["world_size"] == 2  # one run, recorded by rank 0
    assert runs[0].config["parallel"] == "fsdp"
    sharded = ws.ledger.resolve("fsdp-lora@1")

    (tmp_path / "single.yaml").write_text(CONFIG.format(name="single-lora", steps=steps))
    single = train(ws, load_config(tmp_path / "single.yaml"), progress=False)
    a, b = adapter(ws, sharded), adapter(ws, single)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    ma, mb = runs[0].metrics, ws.ledger.get_run(single.run_id).metrics
    assert ma["tokens"] == mb["tokens"] and abs(ma["final_loss"] - mb["final_loss"]) < 1e-5
    assert abs(ma["val_loss"] - mb["val_loss"]) < 1e-5

    # killed mid-run (every process), then resumed under torchrun: the same adapter
    (tmp_path / "killed.yaml").write_text(CONFIG.format(name="killed-lora", steps=steps))
    proc = torchrun(ws, tmp_path, tmp_path / "killed.yaml", wait=False)
    wait_for_step(proc, ws.root / "checkpoints" / "train" / "killed-lora", 2)
    with pytest.raises(NotFoundError):  # killed before it finished
        ws.ledger.resolve("killed-lora")
    for pid in [proc.pid, *descendants(proc.pid)]:  # every process, at once, with no chance to checkpoint
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()
    again = torchrun(ws, tmp_path, tmp_path / "killed.yaml", "--resume")
    assert again.returncode == 0, failure(again)
    resumed = ws.ledger.resolve("killed-lora@1")
    assert ws.ledger.get_run(resumed.run_id).metrics["resumed_from_step"] >= 2
    c = adapter(ws, resumed)
    for k in b:
        torch.testing.assert_close(c[k], b[k], rtol=0, atol=1e-5)
