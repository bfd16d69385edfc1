"""The training loop and the stage's entry point, ``train(ws, config)``.

One optimiser step::

    examples of the step (a pure function of seed and step)  ->  micro-batches (batch_size, token budget)
    for each micro-batch:  packed row -> hidden states -> output layer at target positions only
                           -> summed CE / target tokens of the whole step -> backward
    clip, AdamW step, learning rate for the next step

What differs between objectives (SFT, DPO) lives behind the small interface of ``objective``: encoding,
the micro-batch body, the step's logged loss, validation and extra metrics; the loop has no branch on it.

Every ``checkpoint_every`` steps, and when SIGTERM/SIGINT arrives, a complete checkpoint is written;
``resume=True`` restores the newest one exactly (weights, optimiser, RNGs, step, history).
"""

from __future__ import annotations

import contextlib
import math
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..canonical import canonical_json, sha256_bytes
from ..debris import scratch_prefix
from ..errors import ConfigError, InputError
from ..ledger import Artifact
from ..memory import huge_pages, map_large_blocks_for
from ..progress import Progress, callback
from ..workspace import Workspace
from . import data as D
from . import fsdp
from .adapters import ADAPTER_META, apply_method, load_weights, quantization_spec, read_adapter_meta, trainable
from .checkpoint import Checkpointer, checkpoint_folder, restore
from .config import TrainConfig
from .distributed import all_reduce_grads, all_sum, any_flag, barrier, device_name, resolve_device, setup
from .kernels import fuse_elementwise
from .objective import make_objective
from .plan import check as check_plan
from .plan import make_plan, measured_peak
from .report import default_threads, model_counts, plot_loss, step_flops, write_metrics
from .resume import resume_point

# Keys that do not change the result: a checkpoint may be resumed with them changed.
CADENCE_KEYS = ("checkpoint_every", "keep_checkpoints", "checkpoint_dir", "log_every", "parallel")


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based) of ``total``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return cfg.lr * max(0.0, 1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class State:
    """What the loop carries from step to step (saved in checkpoints as JSON)."""

    step: int = 0
    tokens: int = 0
    target_tokens: int = 0
    flops: float = 0.0
    elapsed: float = 0.0
    history: list[dict] = field(default_factory=list)
    best_val: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False

    def to_json(self) -> dict:
        return dict(self.__dict__)


class _Signals:
    """Turns SIGTERM/SIGINT into a flag checked between steps (main thread only)."""

    def __init__(self):
        self.received: int | None = None
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def config_digest(resolved: dict) -> str:
    return sha256_bytes(canonical_json({k: v for k, v in resolved.items() if k not in CADENCE_KEYS}))


@dataclass
class Inputs:
    """The resolved inputs of a run: folders, artifacts, the resolved config and the input digests."""

    base_dir: Path
    base_art: Artifact
    ds_dir: Path
    ds_art: Artifact
    parent_dir: Path | None
    parent_art: Artifact | None
    resolved: dict
    digests: list[str]


def resolve_inputs(ws: Workspace, cfg: TrainConfig, world) -> Inputs:
    """Materialise base, dataset and parent adapter (rank 0 first, so no two processes build one cache folder)."""
    from ..models import model_path

    if not world.main:
        barrier(world)
    base_dir, base_art = model_path(ws, cfg.base_model)
    ds_art = ws.ledger.resolve(cfg.dataset, kind="dataset")
    ds_dir = ws.store.materialize(ds_art.digest)
    parent_art, parent_dir = None, None
    if cfg.init_from:
        parent_art = ws.ledger.resolve(cfg.init_from, kind="adapter")
        parent_dir = ws.store.materialize(parent_art.digest)
        pmeta = read_adapter_meta(parent_dir)
        if pmeta.get("base_model") != base_art.digest:
            raise ConfigError(
                f"adapter {cfg.init_from} was trained on base {pmeta.get('base_model')}, "
                f"not on {cfg.base_model} ({base_art.digest})",
                field="init_from",
                hint="set base_model to the adapter's base",
            )
    if world.main:
        barrier(world)
    resolved = cfg.model_dump(mode="json")
    resolved["resolved"] = {
        "base_model": base_art.digest,
        "dataset": ds_art.digest,
        "init_from": parent_art.digest if parent_art else None,
    }
    digests = [base_art.digest, ds_art.digest] + ([parent_art.digest] if parent_art else [])
    return Inputs(base_dir, base_art, ds_dir, ds_art, parent_dir, parent_art, resolved, digests)


def build_model(cfg: TrainConfig, inp: Inputs, device):
    """(model in train mode on ``device``, method facts, compiled-kernel counts)."""
    quant = quantization_spec(cfg, device)  # DependencyError here, before any weight loads, without the extra
    model = load_weights(inp.base_dir, cfg.dtype, quant, device)
    if quant is None:
        model.to(device)
    model, method = apply_method(model, cfg, inp.parent_dir)
    method["quantization"] = quant
    kernel_counts = fuse_elementwise(model) if cfg.compile else {}
    if cfg.gradient_checkpointing:
        enable_checkpointing(model, cfg.checkpoint_layers)
    model.train()
    return model, method, kernel_counts


def enable_checkpointing(model, layers: int | None = None) -> int:
    """Gradient checkpointing (non-reentrant) on the first ``layers`` decoder layers (None: all but the last,
    ``plan.default_checkpoint_layers``); the others keep their activations for backward. Returns how many
    layers recompute."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from .plan import default_checkpoint_layers

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    blocks = [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer)]
    n = default_checkpoint_layers(len(blocks)) if layers is None else min(layers, len(blocks))
    for i, m in enumerate(blocks):
        m.gradient_checkpointing = i < n
    return n


def largest_micro_batch(cfg: TrainConfig, lengths: list[int], steps: list[list[int]]) -> int:
    """Tokens (padding included when packing is off) of the largest forward pass the run will make."""
    most = 0
    for idx in steps:
        for mb in D.micro_batches(idx, cfg.batch_size, lengths, cfg.micro_batch_tokens):
            ls = [lengths[i] for i in mb]
            most = max(most, sum(ls) if cfg.packing else len(ls) * max(ls))
    return most


def prepare(ws: Workspace, cfg: TrainConfig, world):
    """Everything before the weights: inputs, device, tokenizer, data, and the memory plan (refused when it
    does not fit, before anything loads)."""
    from transformers import AutoTokenizer

    inp = resolve_inputs(ws, cfg, world)
    device = resolve_device(cfg.device)
    quantization_spec(cfg, device)  # a missing bitsandbytes is reported before the data is tokenised
    if cfg.parallel == "fsdp" and world.size > 1:
        fsdp.check_supported(cfg)
    tok = AutoTokenizer.from_pretrained(inp.base_dir)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    data = build_data(cfg, tok, inp.ds_dir, pad_id)
    plan = make_plan(cfg, inp.base_dir, largest_micro_batch(cfg, data[4], data[5]), device, world.size)
    return inp, device, tok, pad_id, data, plan


def build_data(cfg: TrainConfig, tok, ds_dir: Path, pad_id: int):
    """(objective, train examples, validation examples, skipped, lengths, the plan of steps)."""
    meta, rows = D.read_dataset(ds_dir, cfg.split)
    obj = make_objective(cfg, tok, meta, pad_id)
    train_ex, skipped = obj.encode(rows)
    val_ex: list = []
    if cfg.validation_split and (ds_dir / f"{cfg.validation_split}.parquet").is_file():
        _, vrows = D.read_dataset(ds_dir, cfg.validation_split)
        val_ex, _ = obj.encode(vrows[: cfg.eval_max_examples])
    lengths = [obj.length(e) for e in train_ex]
    steps = D.plan(lengths, cfg.batch_size, cfg.grad_accum, cfg.epochs, cfg.max_steps, cfg.seed, cfg.group_by_length)
    return obj, train_ex, val_ex, skipped, lengths, steps


@dataclass
class Loop:
    """What one optimiser step needs, built once by ``train``."""

    cfg: TrainConfig
    model: object
    obj: object
    weights: dict
    opt: object
    lengths: list[int]
    steps: list[list[int]]
    counts: dict
    world: object
    sharded: bool = False  # parallel: fsdp under torchrun

    def save(self, ckpt: Checkpointer, st: State, best: dict | None) -> None:
        """A checkpoint of this step (FSDP: full tensors gathered on every process, written by rank 0)."""
        weights, opt = fsdp.gathered(self.weights, self.opt) if self.sharded else (self.weights, self.opt)
        if self.sharded and best is not None:
            best = {k: fsdp.full(v) for k, v in best.items()}
        if self.world.main:
            ckpt.save(st.step, weights, opt, st.to_json(), best)

    def step(self, st: State) -> tuple[float, float, float, dict]:
        """One optimiser step on ``steps[st.step]``; returns (loss, lr, grad norm, extra metrics)."""
        import torch

        cfg, world, total = self.cfg, self.world, len(self.steps)
        idx = self.steps[st.step]
        lr = lr_at(cfg, st.step, total)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        step = self.obj.start_step(idx)
        step_loss = 0.0
        mbs = D.micro_batches(idx, cfg.batch_size, self.lengths, cfg.micro_batch_tokens)
        mine = mbs[world.rank :: world.size]  # this process's share of the step
        for mb in mine:
            step_loss += self.obj.micro_batch(self.model, step, mb)
        if self.sharded:  # FSDP: every process makes as many passes as the busiest one (weight 0: no effect)
            for _ in range(len(mine), -(-len(mbs) // world.size)):
                self.obj.micro_batch(self.model, step, mbs[0], weight=0.0)
        params = list(self.weights.values())
        all_reduce_grads(fsdp.replicated(params) if self.sharded else params, world)
        loss, extra = self.obj.summary(
            step, all_sum(step_loss, world), {k: all_sum(v, world) for k, v in step.stats.items()}
        )
        if cfg.max_grad_norm is not None:
            gnorm = float(fsdp.full(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)))
        else:
            gnorm = float(fsdp.full(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])))
        if not math.isfinite(loss):
            raise InputError(
                f"the loss became {loss} at step {st.step + 1}", hint="lower lr, or check the data for empty targets"
            )
        self.opt.step()
        n_tok = sum(self.lengths[i] for i in idx)
        st.step += 1
        st.tokens += n_tok
        st.target_tokens += step.n_target
        st.flops += step_flops(
            self.counts, [n for i in idx for n in self.obj.seq_lengths(self.obj.train_ex[i])], step.n_target
        )
        return loss, lr, gnorm, extra


def _validate(lp: Loop, st: State, best: dict | None) -> dict | None:
    """Validation after a step: history, best weights, early stopping; returns the (new) best weights."""
    ev = lp.obj.evaluate(lp.model)
    val = ev["val_loss"]
    st.history.append({"step": st.step, **ev})
    patience = lp.cfg.early_stopping_patience
    if st.best_val is None or val < st.best_val:
        st.best_val, st.best_step, st.bad_evals = val, st.step, 0
        if patience:
            best = {k: v.detach().clone() for k, v in lp.weights.items()}
    else:
        st.bad_evals += 1
        if patience and st.bad_evals >= patience:
            st.stopped_early = True
    return best


def memory_plan(ws: Workspace, config: TrainConfig):
    """The memory plan of ``config`` (``finetrace train CONFIG --plan``): inputs resolved and data tokenised,
    no weight loaded, nothing recorded."""
    from .distributed import World

    return prepare(ws, config, World(0, int(__import__("os").environ.get("WORLD_SIZE", "1"))))[-1]


def train(ws: Workspace, config: TrainConfig, resume: bool = False, progress: Progress | None = None) -> Artifact:
    """Train ``config`` in workspace ``ws`` and record the adapter artifact and the run.

    Raises ConfigError/InputError for bad configs or data, IntegrityError for a corrupt checkpoint,
    KeyboardInterrupt after a signal (checkpoint saved). ``resume`` with no checkpoint starts fresh and a
    config whose adapter is already recorded returns it, each with a ``ResumeWarning`` (see ``resume.py``).
    """
    import torch

    from ..models.identity import text_identity

    cfg = config
    world = setup()
    torch.set_num_threads(cfg.threads or default_threads(world.size))
    inp, device, tok, pad_id, data, plan = prepare(ws, cfg, world)
    check_plan(plan)
    obj, train_ex, val_ex, skipped, lengths, steps = data
    model, method, kernel_counts = build_model(cfg, inp, device)
    hidden = getattr(model.config, "hidden_size", 0) if device.type == "cpu" else 0
    memory = {"huge_pages": huge_pages(), "large_blocks_mapped": map_large_blocks_for(hidden)}  # finetrace.memory
    sharded = cfg.parallel == "fsdp" and world.size > 1
    if sharded:
        fsdp.shard(model)
    total = len(steps)

    weights = trainable(model)
    opt = torch.optim.AdamW(
        list(weights.values()),
        lr=lr_at(cfg, 0, total),
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        foreach=False,
    )
    ckpt = Checkpointer(
        checkpoint_folder(ws.root, cfg.checkpoint_dir, cfg.output_name),
        config_digest(inp.resolved),
        cfg.keep_checkpoints,
        ws.root,
    )
    # every rank decides alike (read-only); a checkpoint is verified before any work
    recorded, loaded = resume_point(ws, ckpt) if resume else (None, None)
    if recorded is not None:
        if world.main:
            ckpt.clear()
        return recorded
    obj.prepare(model, train_ex, val_ex, [i for s in steps for i in s], world)  # before weights are restored

    st = State()
    best: dict | None = None
    if loaded is not None:
        if sharded:
            loaded = fsdp.shard_loaded(loaded, weights)
        saved = restore(loaded, weights, opt)
        st = State(**{k: v for k, v in saved.items() if k in State.__dataclass_fields__})
        best = loaded["best"]
    elif world.main:
        ckpt.clear()
    barrier(world)
    resumed_from = st.step if loaded is not None else None
    lp = Loop(cfg, model, obj, weights, opt, lengths, steps, model_counts(model), world, sharded)

    recording = (
        ws.ledger.run(
            "train",
            config=inp.resolved,
            inputs=inp.digests,
            seed=cfg.seed,
            environment_extra={
                "torch_threads": torch.get_num_threads(),
                "compiled_kernels": kernel_counts,
                "device": str(device),
                "device_name": device_name(device),
                "world_size": world.size,
                "quantization": method["quantization"],
                "memory": memory,
            },
        )
        if world.main
        else contextlib.nullcontext(None)
    )
    with recording as run, _Signals() as sigs:
        bar = callback(progress) if world.main else None
        if bar is not None:
            bar("train", st.step, total, "")
        best = _run_steps(lp, st, best, ckpt, sigs, bar, total, bool(val_ex))

        final_eval = _final(lp, best)  # on every process: FSDP's forward is a collective
        state = {n: fsdp.full(p.detach()) for n, p in weights.items()} if sharded else None
        if not world.main:  # rank 0 writes the adapter and the run
            barrier(world)
            return ws.ledger.resolve(cfg.output_name)
        counts = {
            "examples": len(train_ex),
            "skipped_too_long": skipped,
            "resumed_from_step": resumed_from,
            "memory_plan": plan.to_json(),
            **measured_peak(device),
        }
        art = _record(ws, run, lp, st, final_eval, state, inp, tok, method, text_identity(tok), counts)
    ckpt.clear()
    if cfg.tracking is not None:  # MLflow / TensorBoard, read back from what the ledger now holds
        from ..tracking import track_run

        track_run(ws, run.id, cfg.tracking)
    barrier(world)
    return art


def _run_steps(lp: Loop, st: State, best: dict | None, ckpt: Checkpointer, sigs, bar, total: int, has_val: bool):
    """The training steps from ``st.step`` to ``total`` (or early stopping): history, validation, progress,
    checkpoints; a signal saves a checkpoint and raises KeyboardInterrupt. Returns the best weights."""
    session_t0, session_tokens = time.perf_counter(), 0
    try:
        while st.step < total and not st.stopped_early:
            t0, tokens0 = time.perf_counter(), st.tokens
            loss, lr, gnorm, extra = lp.step(st)
            st.elapsed += time.perf_counter() - t0
            session_tokens += st.tokens - tokens0
            if st.step % lp.cfg.log_every == 0 or st.step == total:
                st.history.append(
                    {
                        "step": st.step,
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": gnorm,
                        "tokens": st.tokens,
                        "target_tokens": st.target_tokens,
                        **extra,
                    }
                )
            if has_val and lp.cfg.eval_every and (st.step % lp.cfg.eval_every == 0 or st.step == total):
                best = _validate(lp, st, best)
            if bar is not None:
                tps = session_tokens / max(1e-9, time.perf_counter() - session_t0)
                bar("train", st.step, total, f"loss {loss:.4f}{lp.obj.progress(extra)}  {tps:,.0f} tok/s")
            if any_flag(sigs.received is not None, lp.world):
                lp.save(ckpt, st, best)
                raise KeyboardInterrupt(f"stopped by a signal after step {st.step}; resume with --resume")
            if lp.cfg.checkpoint_every and st.step % lp.cfg.checkpoint_every == 0 and st.step < total:
                lp.save(ckpt, st, best)
    finally:  # the last step reached, also when a signal or an error ends the loop
        if bar is not None:
            bar("train", st.step, total, "")
    return best


def _final(lp: Loop, best: dict | None) -> dict:
    """Put the best weights back (early stopping) and evaluate the final adapter."""
    import torch

    if best is not None:
        with torch.no_grad():
            for k, p in lp.weights.items():
                p.copy_(best[k])
    return lp.obj.evaluate(lp.model) if lp.obj.val_ex else {}


def _record(
    ws: Workspace,
    run,
    lp: Loop,
    st: State,
    final_eval: dict,
    state: dict | None,
    inp: Inputs,
    tok,
    method: dict,
    ident: dict,
    counts: dict,
) -> Artifact:
    """Write the adapter (from ``state`` when given: gathered FSDP tensors) and the run's metrics; rank 0."""
    cfg = lp.cfg
    train_losses = [r["loss"] for r in st.history if "loss" in r]
    val_loss = final_eval.get("val_loss")
    base_art, ds_art, parent_art = inp.base_art, inp.ds_art, inp.parent_art
    facts = {
        "format": "finetrace-adapter/1",
        "base_model": base_art.digest,
        "base_model_ref": base_art.ref,
        "dataset": ds_art.digest,
        "dataset_ref": ds_art.ref,
        "split": cfg.split,
        "parent": parent_art.digest if parent_art else None,
        **method,
        **ident,
        "objective": cfg.objective,
        "seed": cfg.seed,
        "steps": st.step,
        "final_loss": train_losses[-1] if train_losses else None,
        "val_loss": val_loss,
        "config": inp.resolved,
    }
    with tempfile.TemporaryDirectory(dir=ws.root / "cache", prefix=scratch_prefix(ws.root, ".train-")) as tmp:
        out = Path(tmp) / "adapter"
        write_output(lp.model, tok, out, facts, base_art.digest, state)
        write_metrics(out / "metrics.jsonl", st.history)
        plot_loss(
            out / "loss_curve.png",
            st.history,
            f"{cfg.output_name}: {method['method']} on {ds_art.ref}",
            lp.obj.loss_label,
        )
        digest = ws.store.put_dir(out)
    kind = "model" if method["method"] == "full" else "adapter"
    art = run.output(
        kind,
        digest,
        name=cfg.output_name,
        metadata={
            "base_model": base_art.digest,
            "method": method["method"],
            "r": method.get("r"),
            "quantization": method.get("quantization"),
            "target_modules": method.get("target_modules"),
            "parent": facts["parent"],
            **ident,
        },
    )
    wall = st.elapsed
    run.metrics.update(
        {
            "steps": st.step,
            "tokens": st.tokens,
            "target_tokens": st.target_tokens,
            **counts,
            "wall_time_s": round(wall, 3),
            "tokens_per_s": round(st.tokens / wall, 2) if wall else None,
            "final_loss": facts["final_loss"],
            "val_loss": val_loss,
            "best_val_loss": st.best_val,
            "best_step": st.best_step,
            "stopped_early": st.stopped_early,
            "flops_estimate": st.flops,
            "achieved_flops_per_s": round(st.flops / wall, 1) if wall else None,
            "energy_wh_estimate": round(wall * cfg.assumed_watts / 3600, 6),
            "assumed_watts": cfg.assumed_watts,
            **lp.obj.run_metrics(st.history, final_eval),
        }
    )
    return art


def write_output(model, tok, out: Path, facts: dict, base_digest: str, state: dict | None = None) -> None:
    """The adapter folder (PEFT files + facts), or a full model folder for method: full."""
    import json

    from ..atomic import write_bytes

    out.mkdir(parents=True)
    if facts["method"] == "full":
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
    else:
        model.peft_config["default"].base_model_name_or_path = base_digest  # not a local path
        import warnings

        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft looks for a config at the (digest) base path
            model.save_pretrained(tmp, **({"state_dict": state} if state is not None else {}))
            # peft writes target_modules from a set (order varies with PYTHONHASHSEED): sort, so the
            # same training gives the same bytes in any process
            pcfg = json.loads((Path(tmp) / "adapter_config.json").read_text())
            for key, value in pcfg.items():
                if isinstance(value, list) and all(isinstance(v, str) for v in value):
                    pcfg[key] = sorted(value)
            write_bytes(out / "adapter_config.json", (json.dumps(pcfg, indent=2, sort_keys=True) + "\n").encode())
            write_bytes(out / "adapter_model.safetensors", (Path(tmp) / "adapter_model.safetensors").read_bytes())
    write_bytes(out / ADAPTER_META, (json.dumps(facts, indent=2, sort_keys=True) + "\n").encode())
