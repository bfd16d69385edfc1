"""Checkpoints: SIGKILL + --resume equals an uninterrupted run; SIGTERM checkpoints; corruption is an error."""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetrace.errors import IntegrityError
from finetrace.train import load_config, train
from finetrace.train.checkpoint import MARKER, Checkpointer

CONFIG = """base_model: tiny
dataset: toy
output_name: resumable
batch_size: 4
max_steps: {steps}
lr: 1.0e-2
lora:
  r: 8
  dropout: 0.1
eval_every: 7
early_stopping_patience: 50
checkpoint_every: 1
keep_checkpoints: 2
seed: 3
"""


def start_child(zygote, ws, cfg_file: Path):
    """``finetrace train CONFIG`` in a process of its own (forked from the zygote, see cli_zygote.py)."""
    return zygote.start(["-w", str(ws.root), "train", str(cfg_file), "--no-progress"], cfg_file.parent)


def wait_for_step(proc, folder: Path, step: int, timeout: float = 120) -> int:
    """Poll until a complete checkpoint at >= ``step`` exists; return its step."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if folder.is_dir():
            done = [int(d.name[5:]) for d in folder.glob("step-*") if (d / MARKER).is_file()]
            if done and max(done) >= step:
                return max(done)
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training ended (rc {proc.returncode}) before step {step}: {err.decode()[-2000:]}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("no checkpoint appeared in time")


def tensors(ws, art):
    return load_file(ws.store.materialize(art.digest) / "adapter_model.safetensors")


def history(ws, art):
    return (ws.store.materialize(art.digest) / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(tiny_setup, tmp_path, zygote):
    ws, _, _ = tiny_setup
    steps = 16  # two evaluations (eval_every 7); each step checkpoints, so the kill can land on any of them
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(CONFIG.format(steps=steps))
    kill_at = random.randint(3, steps - 6)
    proc = start_child(zygote, ws, cfg_file)
    reached = wait_for_step(proc, ws.root / "checkpoints" / "train" / "resumable", kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert reached < steps, "the run finished before it could be killed"

    cfg = load_config(cfg_file)
    resumed = train(ws, cfg, resume=True, progress=False)
    run = ws.ledger.get_run(resumed.run_id)
    assert run.metrics["resumed_from_step"] >= kill_at and run.metrics["steps"] == steps
    fresh = train(ws, cfg, progress=False)
    a, b = tensors(ws, resumed), tensors(ws, fresh)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert history(ws, resumed) == history(ws, fresh)  # same losses, lrs, val losses at every step
    killed = [r for r in ws.ledger.runs("train") if r.status == "running"]
    assert len(killed) == 1  # the SIGKILLed run stays visibly unfinished in the ledger...
    from finetrace.workspace import Workspace

    assert Workspace.open(ws.root).ledger.get_run(killed[0].id).status == "interrupted"  # ...until the next start


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_corruption_is_an_error(tiny_setup, tmp_path, zygote):
    ws, _, _ = tiny_setup
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(
        CONFIG.format(steps=20000)
        .replace("checkpoint_every: 1", "checkpoint_every: 1000")
        .replace("early_stopping_patience: 50", "early_stopping_patience: null")
    )
    folder = ws.root / "checkpoints" / "train" / "resumable"
    proc = start_child(zygote, ws, cfg_file)
    # no periodic checkpoints: wait until the run is training, then ask it to stop
    t0 = time.time()
    while not [r for r in ws.ledger.runs("train") if r.status == "running"] and time.time() - t0 < 120:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out + err).decode()[-2000:]
    ckpts = Checkpointer(folder, "").complete()
    assert len(ckpts) == 1
    state = json.loads((ckpts[0] / "state.json").read_text())
    assert 0 < state["step"] < 20000 and state["history"][-1]["step"] == state["step"]
    assert [r.status for r in ws.ledger.runs("train")] == ["interrupted"]
    files = {p.name for p in ckpts[0].iterdir()} - {"best.safetensors"}  # best: once an eval has run
    assert files == {MARKER, "optimizer.safetensors", "rng.safetensors", "state.json", "weights.safetensors"}

    # flip one byte of the weights: resuming is an integrity error, never a silent fresh start
    w = ckpts[0] / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    cfg = load_config(cfg_file)
    with pytest.raises(IntegrityError, match="weights.safetensors"):
        train(ws, cfg, resume=True, progress=False)
    # a changed config cannot resume this checkpoint either
    w.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(IntegrityError, match="different training config"):
        train(ws, load_config(cfg_file, ["lr=0.5"]), resume=True, progress=False)


def test_checkpoint_round_trip_restores_rng_and_optimizer(tmp_path):
    import numpy as np

    from finetrace.train.checkpoint import restore

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = torch.optim.AdamW([p], lr=0.1, foreach=False)
    p.grad = torch.randn(3, 4)
    opt.step()
    ck = Checkpointer(tmp_path / "ck", "sha256:x", keep=2)
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    first = ck.save(1, {"p": p}, opt, {"history": []})
    want = draws()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    q = torch.nn.Parameter(torch.zeros(3, 4))
    opt2 = torch.optim.AdamW([q], lr=0.1, foreach=False)
    restore(ck.load(first), {"p": q}, opt2)
    assert draws() == want
    assert torch.equal(q, p)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt2.state[q][key], opt.state[p][key])
    for step in (2, 3):
        ck.save(step, {"p": p}, opt, {"history": []})
    assert [d.name for d in ck.complete()] == ["step-00000002", "step-00000003"]  # keep=2 prunes
    (tmp_path / "ck" / "step-00000009").mkdir()  # no marker: incomplete, never chosen
    assert ck.latest().name == "step-00000003"
    with pytest.raises(IntegrityError, match="different training config"):
        Checkpointer(tmp_path / "ck", "sha256:y").load()
