"""``finetrace reproduce RUN``: re-execute a recorded train or evaluate run from the ledger alone.

The run's recorded config is replayed through the stage's public entry point with every input pinned
by digest (``resolved`` base model, dataset and parent adapter for training; model, adapters, dataset
and suite for evaluation), the recorded seed and the recorded torch thread count. The new output is
compared with the recorded one:

    train     every tensor of ``adapter_model.safetensors`` (largest absolute difference), the
              ``adapter_config.json``, the per-step metrics (``metrics.jsonl``: losses, tokens) and the
              adapter facts without the config (whose refs are now digests)
    evaluate  the ``models`` section of ``report.json`` (metrics, intervals, answers, bias, gates)

The result is recorded as a ``reproduce`` run (inputs: the original outputs and the reproduction's,
metrics: ``bit_identical``, ``max_abs_diff``) after the stage's own run. Cadence-only settings
(checkpoint folder) are moved to a scratch folder; they do not change results.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import InputError
from ..workspace import Workspace

IGNORED_TRAIN_FILES = ("loss_curve.png",)  # the title names the output; the data is in metrics.jsonl


@dataclass
class FileComparison:
    path: str
    identical: bool
    max_abs_diff: float | None = None
    note: str = ""


@dataclass
class ReproduceResult:
    run_id: str
    kind: str
    reproduced_run_id: str
    original: str
    reproduced: str
    bit_identical: bool
    max_abs_diff: float
    files: list[FileComparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    record_run_id: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _tensor_diff(a: bytes, b: bytes) -> tuple[bool, float, str]:
    import numpy as np
    from safetensors.numpy import load

    ta, tb = load(a), load(b)
    if set(ta) != set(tb):
        return False, float("inf"), f"tensor names differ: {sorted(set(ta) ^ set(tb))[:3]}"
    worst, note = 0.0, ""
    for k in sorted(ta):
        x, y = ta[k], tb[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            return False, float("inf"), f"{k}: shape/dtype {x.shape}/{x.dtype} vs {y.shape}/{y.dtype}"
        d = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
        if d > worst:
            worst, note = d, f"largest difference in {k}"
    return a == b, worst, note


def _numeric_diff(a, b, path="") -> tuple[float, str]:
    """Largest absolute difference between numbers at the same place in two JSON values."""
    if isinstance(a, bool) or isinstance(b, bool):
        return (0.0, "") if a == b else (float("inf"), path)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)), path
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return float("inf"), f"{path} keys"
        best = (0.0, "")
        for k in a:
            best = max(best, _numeric_diff(a[k], b[k], f"{path}.{k}"), key=lambda t: t[0])
        return best
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return float("inf"), f"{path} length"
        best = (0.0, "")
        for i, (x, y) in enumerate(zip(a, b)):
            best = max(best, _numeric_diff(x, y, f"{path}[{i}]"), key=lambda t: t[0])
        return best
    return (0.0, "") if a == b else (float("inf"), path)


def _files(ws: Workspace, digest: str) -> dict[str, bytes]:
    return {e.path: ws.store.read_bytes(e.digest) for e in ws.store.tree(digest)}


def compare_adapters(ws: Workspace, original: str, reproduced: str) -> list[FileComparison]:
    fa, fb = _files(ws, original), _files(ws, reproduced)
    out = []
    for path in sorted(set(fa) | set(fb)):
        if path in IGNORED_TRAIN_FILES:
            continue
        if path not in fa or path not in fb:
            out.append(FileComparison(path, False, float("inf"), "present in only one of the two"))
        elif path.endswith(".safetensors"):
            same, diff, note = _tensor_diff(fa[path], fb[path])
            out.append(FileComparison(path, same, diff, note))
        elif path == "finetrace_adapter.json":
            a, b = json.loads(fa[path]), json.loads(fb[path])
            for d in (a, b):
                d.pop("config", None)
                for k in ("base_model_ref", "dataset_ref"):
                    d.pop(k, None)
            diff, where = _numeric_diff(a, b)
            out.append(
                FileComparison(
                    path,
                    a == b,
                    diff,
                    "compared without the config (refs became digests)" + (f"; differs at {where}" if a != b else ""),
                )
            )
        elif path.endswith(".jsonl"):
            a = [json.loads(line) for line in fa[path].splitlines() if line.strip()]
            b = [json.loads(line) for line in fb[path].splitlines() if line.strip()]
            diff, where = _numeric_diff(a, b)
            out.append(FileComparison(path, fa[path] == fb[path], diff, f"differs at {where}" if a != b else ""))
        else:
            out.append(FileComparison(path, fa[path] == fb[path], 0.0 if fa[path] == fb[path] else None))
    return out


def _reproduce_train(ws: Workspace, run) -> tuple[str, str, list[FileComparison], list[str]]:
    from ..train import TrainConfig, train

    cfg = dict(run.config)
    resolved = cfg.pop("resolved", None) or {}
    notes = []
    for key in ("base_model", "dataset", "init_from"):
        if resolved.get(key):
            cfg[key] = resolved[key]
    threads = run.environment.get("torch_threads")
    if threads:
        cfg["threads"] = threads
    else:
        notes.append("the thread count was not recorded; the default was used")
    original = next((d for d in run.outputs if ws.ledger.artifact(d).kind in ("adapter", "model")), None)
    if original is None:
        raise InputError(
            f"run {run.id} recorded no adapter output", hint="only a succeeded train run can be reproduced"
        )
    cfg["output_name"] = f"{cfg['output_name']}-reproduce"[:128]
    with tempfile.TemporaryDirectory(dir=ws.cache, prefix=".reproduce-") as tmp:
        cfg["checkpoint_dir"] = str(Path(tmp) / "checkpoints")
        art = train(ws, TrainConfig.model_validate(cfg), progress=None)
    return original, art.digest, compare_adapters(ws, original, art.digest), notes


def _reproduce_evaluate(ws: Workspace, run) -> tuple[str, str, list[FileComparison], list[str]]:
    import torch

    from ..evaluate import Suite, compare

    cfg = run.config
    notes = []
    threads = run.environment.get("torch_threads")
    if threads:
        torch.set_num_threads(int(threads))
    else:
        notes.append("the thread count was not recorded for this evaluation; the current setting was used")
    original = next((d for d in run.outputs if ws.ledger.artifact(d).kind == "eval_report"), None)
    if original is None:
        raise InputError(f"run {run.id} recorded no eval_report output")
    suite = Suite.model_validate(cfg["suite"])
    name = ws.ledger.artifact(original).name
    art = compare(
        ws,
        cfg["model"],
        list(cfg.get("adapters") or []),
        f"{cfg['dataset']}:{cfg['split']}",
        suite,
        name=f"{name or 'eval'}-reproduce",
    )
    a = json.loads(_files(ws, original)["report.json"])
    b = json.loads(_files(ws, art.digest)["report.json"])
    diff, where = _numeric_diff(a.get("models"), b.get("models"))
    same = a.get("models") == b.get("models") and a.get("examples") == b.get("examples")
    comps = [
        FileComparison(
            "report.json",
            same,
            diff,
            "compared the models and examples sections (run ids differ by design)"
            + (f"; largest difference at models{where}" if not same else ""),
        )
    ]
    notes.append("the reproduction records its own gate verdict for each adapter")
    return original, art.digest, comps, notes


def reproduce(ws: Workspace, run_id: str) -> ReproduceResult:
    """Re-execute recorded run ``run_id`` (a train or evaluate run) and compare its outputs.

    Raises NotFoundError for an unknown run, InputError for a run kind that cannot be replayed or a
    run that did not succeed.
    """
    led = ws.ledger
    run = led.get_run(run_id)
    if run.status != "succeeded":
        raise InputError(f"run {run.id} {run.status}; only a succeeded run can be reproduced")
    ws.cache.mkdir(parents=True, exist_ok=True)
    before = {r.id for r in led.runs()}
    if run.kind == "train":
        original, new, comps, notes = _reproduce_train(ws, run)
    elif run.kind == "evaluate":
        original, new, comps, notes = _reproduce_evaluate(ws, run)
    else:
        raise InputError(
            f"run {run.id} is a {run.kind} run; reproduce replays train and evaluate runs",
            hint="`finetrace log --kind train` lists training runs",
        )
    new_runs = [r for r in led.runs(run.kind) if r.id not in before]
    diffs = [c.max_abs_diff for c in comps if c.max_abs_diff is not None]
    result = ReproduceResult(
        run.id,
        run.kind,
        new_runs[-1].id if new_runs else "",
        original,
        new,
        all(c.identical for c in comps),
        max(diffs, default=0.0),
        comps,
        notes,
    )
    with led.run("reproduce", {"run": run.id, "kind": run.kind}, inputs=[original]) as rec:
        rec.input(new)
        rec.metrics.update(
            {
                "bit_identical": result.bit_identical,
                "max_abs_diff": result.max_abs_diff if result.max_abs_diff != float("inf") else None,
                "reproduced_run": result.reproduced_run_id,
                "differing_files": [c.path for c in comps if not c.identical],
            }
        )
        result.record_run_id = rec.id
    return result
