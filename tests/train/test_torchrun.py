"""``finetrace train`` under ``torchrun --nproc_per_node=2`` (gloo): DDP (LoRA and DPO) and FSDP2 train the
adapter of one process at the same global batch and record one run; an FSDP run killed with SIGKILL
resumes under torchrun to the same adapter.

Starting a torchrun costs three interpreters importing torch, transformers and peft (tens of CPU-seconds
on 2 cores), so the module starts two: one whose workers run the DDP, DPO and FSDP configs one after
the other and then the config the test kills (the worker script calls the real CLI once per config, in
the process group torchrun set up), and one ``--resume`` of the killed run. The single-process runs they
are compared with train in the test process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetrace.errors import NotFoundError
from finetrace.train import load_config, train

pytestmark = pytest.mark.slow

DDP = (
    "base_model: tiny\ndataset: toy\noutput_name: {name}\nbatch_size: 4\ngrad_accum: 2\nmax_steps: 4\n"
    "lr: 1.0e-2\neps: 1.0e-3\ncheckpoint_every: 2\nseed: 2\n"
)
DPO = (
    "base_model: tiny\ndataset: prefs\nobjective: dpo\noutput_name: {name}\nbatch_size: 4\ngrad_accum: 2\n"
    "max_steps: 3\nlr: 1.0e-2\neps: 1.0e-3\neval_every: 3\ncheckpoint_every: null\nseed: 2\nthreads: 1\n"
)
# grad_accum 3 over 2 processes: one process makes a weight-0 pass in every step (FSDP needs equal passes)
FSDP = (
    "base_model: tiny\ndataset: toy\noutput_name: {name}\nparallel: fsdp\nbatch_size: 4\ngrad_accum: 3\n"
    "max_steps: {steps}\nlr: 1.0e-2\neps: 1.0e-3\ncheckpoint_every: 1\neval_every: 5\nseed: 2\n"
)
FSDP_STEPS = 10
WORKER = """import sys
from finetrace.cli import main

# argv: WORKSPACE CONFIG... [--resume]: one `finetrace train` per config, in this process group
ws, *configs = sys.argv[1:]
extra = [c for c in configs if c.startswith("--")]
for cfg in [c for c in configs if not c.startswith("--")]:
    code = main(["-w", ws, "train", cfg, "--no-progress", *extra])
    if code:
        sys.exit(code)
"""


def torchrun(ws, tmp_path: Path, configs: list[Path], *extra: str, wait: bool = True):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(ws.root),
        *map(str, configs),
        *extra,
    ]
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def failure(stderr: str) -> str:
    lines = stderr.splitlines()
    said = [ln for ln in lines if "rror" in ln or "hint" in ln.lower()]
    return "\n".join(said[-20:]) + "\n" + "\n".join(lines[-30:])


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
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


def tensors(ws, art):
    return load_file(ws.store.materialize(art.digest) / "adapter_model.safetensors")


def history(ws, art) -> list[dict]:
    import json

    return [json.loads(line) for line in (ws.store.materialize(art.digest) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def launched(learnable_model_dir, tmp_path_factory):
    """The workspace after the first torchrun: DDP, DPO and FSDP runs done, the last config SIGKILLed at a
    complete checkpoint of step >= 2 (every process at once, with no chance to checkpoint)."""
    from finetrace.data import import_dataset
    from finetrace.workspace import Workspace

    from .conftest import fill_workspace
    from .test_dpo import preference_rows, write_jsonl
    from .test_resume import wait_for_step

    tmp = tmp_path_factory.mktemp("torchrun")
    ws = Workspace.init(tmp / "ws")
    fill_workspace(ws, learnable_model_dir, tmp)
    import_dataset(ws, [write_jsonl(tmp / "prefs.jsonl", preference_rows(48))], "prefs", splits=(0.8, 0.2, 0.0))
    configs = {
        "ddp": DDP.format(name="ddp-lora"),
        "dpo": DPO.format(name="ddp-dpo"),
        "fsdp": FSDP.format(name="fsdp-lora", steps=FSDP_STEPS),
        "killed": FSDP.format(name="killed-lora", steps=FSDP_STEPS),
    }
    for name, text in configs.items():
        (tmp / f"{name}.yaml").write_text(text)
    proc = torchrun(ws, tmp, [tmp / f"{name}.yaml" for name in configs], wait=False)
    try:
        wait_for_step(proc, ws.root / "checkpoints" / "train" / "killed-lora", 2, timeout=400)
    except BaseException:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    for pid in [proc.pid, *descendants(proc.pid)]:  # every process, at once
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, err = proc.communicate()
    yield ws, tmp, err.decode(errors="replace")
    ws.close()


def single(ws, tmp: Path, name: str, text: str):
    (tmp / f"single-{name}.yaml").write_text(text)
    return train(ws, load_config(tmp / f"single-{name}.yaml"), progress=False)


def one_run(ws, ref: str, stderr: str):
    try:
        art = ws.ledger.resolve(ref)
    except NotFoundError:
        pytest.fail(f"{ref} was not recorded by the torchrun:\n{failure(stderr)}")
    run = ws.ledger.get_run(art.run_id)
    assert run.environment["world_size"] == 2 and run.status == "succeeded"
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.is_file() and "[never]" not in thp.read_text():  # each rank started as `finetrace train` does
        # huge pages always; large blocks mapped only from hidden size 2048 (the tiny model's is far smaller)
        assert run.environment["memory"] == {"huge_pages": True, "large_blocks_mapped": False}
    name = ref.split("@")[0]
    assert [r.id for r in ws.ledger.runs("train") if r.config["output_name"] == name] == [run.id]  # one run
    return art, run


def assert_same_weights(ws, x, y) -> None:
    """The two adapters' tensors: the same names, equal within 1e-5."""
    a, b = tensors(ws, x), tensors(ws, y)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def test_two_process_gloo_matches_single_process(launched):
    ws, tmp, err = launched
    ddp, run = one_run(ws, "ddp-lora@1", err)
    one = single(ws, tmp, "ddp", DDP.format(name="single-lora"))
    assert_same_weights(ws, ddp, one)
    # written by another process (another PYTHONHASHSEED): the PEFT config is still byte-identical
    config = lambda art: (ws.store.materialize(art.digest) / "adapter_config.json").read_bytes()  # noqa: E731
    assert config(ddp) == config(one)
    ma, mb = run.metrics, ws.ledger.get_run(one.run_id).metrics
    assert ma["tokens"] == mb["tokens"] and abs(ma["final_loss"] - mb["final_loss"]) < 1e-5


def test_two_process_dpo_matches_single_process(launched):
    ws, tmp, err = launched
    ddp, _ = one_run(ws, "ddp-dpo@1", err)
    one = single(ws, tmp, "dpo", DPO.format(name="single-dpo"))
    assert_same_weights(ws, ddp, one)
    # every process saw its share of the pairs; the metrics are those of the whole step, validation included
    for ra, rb in zip(history(ws, ddp), history(ws, one), strict=True):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert abs(ra[key] - rb[key]) < 1e-5, (key, ra, rb)


def test_two_process_fsdp_equals_one_process_and_resumes_after_sigkill(launched):
    ws, tmp, err = launched
    sharded, run = one_run(ws, "fsdp-lora@1", err)
    assert run.config["parallel"] == "fsdp"
    one = single(ws, tmp, "fsdp", FSDP.format(name="single-lora-fsdp", steps=FSDP_STEPS))
    a, b = tensors(ws, sharded), tensors(ws, one)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    ma, mb = run.metrics, ws.ledger.get_run(one.run_id).metrics
    assert ma["tokens"] == mb["tokens"] and abs(ma["final_loss"] - mb["final_loss"]) < 1e-5
    assert abs(ma["val_loss"] - mb["val_loss"]) < 1e-5

    # the run killed mid-way (the fixture), resumed under torchrun: the same adapter
    with pytest.raises(NotFoundError):  # killed before it finished
        ws.ledger.resolve("killed-lora")
    again = torchrun(ws, tmp, [tmp / "killed.yaml"], "--resume")
    assert again.returncode == 0, failure(again.stderr)
    resumed = ws.ledger.resolve("killed-lora@1")
    assert ws.ledger.get_run(resumed.run_id).metrics["resumed_from_step"] >= 2
    c = tensors(ws, resumed)
    for k in b:
        torch.testing.assert_close(c[k], b[k], rtol=0, atol=1e-5)
