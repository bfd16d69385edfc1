"""What a training run reports: metrics lines, the loss-curve PNG, FLOPs and energy estimates, threads.

FLOPs are estimated from the parameters each token meets (Kaplan et al. 2020, with a frozen base):

    per token:          2 N_body (forward) + 2 N_body (backward to activations) + 2 N_train (weight
                        gradients of the trainable part): 4 N + 2 N_train, i.e. 6 N for full fine-tuning
    per target token:   the output layer, 2 V H forward + 2 V H backward (+ 2 V H if it trains)
    attention:          per example of length l and layer, 2 l^2 d (scores + values, causal half) x 3

Energy is wall time x an *assumed* power (``assumed_watts`` in the config), stated with the figure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..atomic import write_bytes


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads do not add matmul throughput)."""
    avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil

        phys = psutil.cpu_count(logical=False) or avail
        logical = psutil.cpu_count(logical=True) or avail
        per_core = max(1, logical // phys)
    except ImportError:
        per_core = 1
    return max(1, avail // per_core)


def default_threads(world_size: int = 1) -> int:
    """Torch threads for a run whose config sets none: ``OMP_NUM_THREADS`` where it is set (the usual way to
    cap a process on a shared machine; the test suite sets 1), else the physical cores shared among the ranks."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, physical_cores() // world_size)


def model_counts(model) -> dict:
    """Parameter counts that the FLOPs estimate needs."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = lm.get_output_embeddings()
    emb = lm.get_input_embeddings()
    skip = {id(head.weight), id(emb.weight)}
    body = sum(p.numel() for p in lm.parameters() if id(p) not in skip)
    train = sum(p.numel() for p in lm.parameters() if p.requires_grad and id(p) not in skip)
    cfg = lm.config
    return {
        "body": body,
        "trainable_body": train,
        "head": head.weight.numel(),
        "head_trains": bool(head.weight.requires_grad),
        "layers": getattr(cfg, "num_hidden_layers", 0),
        "hidden": getattr(cfg, "hidden_size", 0),
    }


def step_flops(counts: dict, lengths: list[int], n_targets: int) -> float:
    """Estimated FLOPs of one optimiser step over examples of the given lengths."""
    tokens = sum(lengths)
    f = tokens * (4 * counts["body"] + 2 * counts["trainable_body"])
    f += n_targets * counts["head"] * (6 if counts["head_trains"] else 4)
    f += sum(3 * 2 * l * l * counts["hidden"] * counts["layers"] for l in lengths)  # noqa: E741
    return float(f)


def write_metrics(path: Path, history: list[dict]) -> None:
    write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in history).encode())


def plot_loss(path: Path, history: list[dict], title: str, ylabel: str = "loss (nats / target token)") -> None:
    """Training loss per step (and validation loss where measured) as a PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    tr = [(r["step"], r["loss"]) for r in history if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    if tr:
        ax.plot(*zip(*tr), label="train", linewidth=1)
    if va:
        ax.plot(*zip(*va), "o-", label="validation", linewidth=1, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    write_bytes(path, buf.getvalue())
