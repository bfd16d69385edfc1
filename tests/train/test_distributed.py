"""``torchrun --nproc_per_node=2`` (gloo) trains the same adapter as one process at the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from finetrace.train import load_config, train

CONFIG = (
    "base_model: tiny\ndataset: toy\noutput_name: {name}\nbatch_size: 4\ngrad_accum: 2\nmax_steps: 4\n"
    "lr: 1.0e-2\neps: 1.0e-3\ncheckpoint_every: 2\nseed: 2\n"
)


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(tiny_setup, tmp_path):
    ws, _, _ = tiny_setup
    script = tmp_path / "cli.py"
    script.write_text("import sys\nfrom finetrace.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    cfg_file = tmp_path / "ddp.yaml"
    cfg_file.write_text(CONFIG.format(name="ddp-lora"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [
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
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = ws.ledger.runs("train")
    assert len(runs) == 1 and runs[0].environment["world_size"] == 2  # one run recorded, by rank 0
    ddp = ws.ledger.resolve("ddp-lora@1")
    assert ddp.run_id == runs[0].id

    single_cfg = tmp_path / "single.yaml"
    single_cfg.write_text(CONFIG.format(name="single-lora"))
    single = train(ws, load_config(single_cfg), progress=False)
    a = load_file(ws.store.materialize(ddp.digest) / "adapter_model.safetensors")
    b = load_file(ws.store.materialize(single.digest) / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    # written by another process (another PYTHONHASHSEED): the PEFT config is still byte-identical
    config = lambda art: (ws.store.materialize(art.digest) / "adapter_config.json").read_bytes()
    assert config(ddp) == config(single)
    ma, mb = runs[0].metrics, ws.ledger.get_run(single.run_id).metrics
    assert ma["tokens"] == mb["tokens"] and abs(ma["final_loss"] - mb["final_loss"]) < 1e-5
