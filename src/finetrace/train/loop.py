"""The training loop and the stage's entry point, ``train(ws, config)``.

One optimiser step::

    examples of the step (a pure function of seed and step)  ->  micro-batches (batch_size, token budget)
    for each micro-batch:  packed row -> hidden states -> output layer at target positions only
                           -> summed CE / target tokens of the whole step -> backward
    clip, AdamW step, learning rate for the next step

``objective: dpo`` swaps the micro-batch body and the metrics for those of ``preference`` (pairs of
sequences, a reference pass before the first step); the rest of the loop is shared.

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
from ..errors import ConfigError, DependencyError, InputError
from ..ledger import Artifact
from ..workspace import Workspace
from . import data as D
from . import preference as P
from .adapters import ADAPTER_META, apply_method, load_base, read_adapter_meta, trainable
from .attention import segments
from .checkpoint import Checkpointer, checkpoint_folder, restore
from .distributed import all_reduce_grads, all_sum, any_flag, barrier, setup
from .config import TrainConfig
from .kernels import fuse_elementwise
from .loss import loss_sum
from .report import model_counts, physical_cores, plot_loss, step_flops, write_metrics
from .resume import resume_point

# Keys that do not change the result: a checkpoint may be resumed with them changed.
CADENCE_KEYS = ("checkpoint_every", "keep_checkpoints", "checkpoint_dir", "log_every")


def resolve_device(name: str):
    """The torch device of ``device: auto|cpu|cuda|cuda:N`` (torchrun has set this process's GPU)."""
    import torch

    from .distributed import gpu_per_process

    if name == "auto":
        name = "cuda" if gpu_per_process() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DependencyError(f"device: {name} was asked for, but PyTorch sees no CUDA GPU here",
                                  hint="set device: cpu (or auto), or install a CUDA build of torch")
        if name == "cuda":
            name = f"cuda:{torch.cuda.current_device()}"
    return torch.device(name)


def device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


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


def _progress(enabled: bool, total: int, start: int):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    prog = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=False)
    prog.start()
    prog.add_task("", total=total, completed=start)
    return prog


def evaluate_loss(model, examples: list[D.Encoded], cfg: TrainConfig, pad_id: int) -> float:
    """Mean CE per target token over ``examples`` (no gradients)."""
    import torch

    was = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(examples), cfg.batch_size):
            batch = D.collate(examples[s:s + cfg.batch_size], cfg.packing, pad_id)
            total += float(loss_sum(model, batch, cfg.loss_chunk))
            n += batch.n_targets
    model.train(was)
    return total / max(1, n)


def train(ws: Workspace, config: TrainConfig, resume: bool = False, progress: bool = True) -> Artifact:
    """Train ``config`` in workspace ``ws`` and record the adapter artifact and the run.

    Raises ConfigError/InputError for bad configs or data, IntegrityError for a corrupt checkpoint,
    KeyboardInterrupt after a signal (checkpoint saved). ``resume`` with no checkpoint starts fresh and a
    config whose adapter is already recorded returns it, each with a ``ResumeWarning`` (see ``resume.py``).
    """
    import torch

    from ..models import model_path
    from ..models.identity import text_identity

    cfg = config
    world = setup()
    torch.set_num_threads(cfg.threads or max(1, physical_cores() // world.size))

    # -- inputs (rank 0 materialises them first, so no two processes build the same cache folder) --
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
            raise ConfigError(f"adapter {cfg.init_from} was trained on base {pmeta.get('base_model')}, "
                              f"not on {cfg.base_model} ({base_art.digest})", field="init_from",
                              hint="set base_model to the adapter's base")
    if world.main:
        barrier(world)
    resolved = cfg.model_dump(mode="json")
    resolved["resolved"] = {"base_model": base_art.digest, "dataset": ds_art.digest,
                            "init_from": parent_art.digest if parent_art else None}
    inputs = [base_art.digest, ds_art.digest] + ([parent_art.digest] if parent_art else [])

    model, tok = load_base(base_dir, cfg.dtype)
    device = resolve_device(cfg.device)
    model.to(device)
    ident = text_identity(tok)
    model, method = apply_method(model, cfg, parent_dir)
    kernel_counts = fuse_elementwise(model) if cfg.compile else {}
    if cfg.gradient_checkpointing:
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    meta, rows = D.read_dataset(ds_dir, cfg.split)
    schema, labels = meta.get("schema"), meta.get("labels")
    P.check_objective(cfg.objective, schema)
    dpo = cfg.objective == "dpo"
    encode = (lambda rs: P.encode_pairs(tok, rs, cfg.max_length)) if dpo else \
        (lambda rs: D.encode_rows(tok, rs, schema, labels, cfg.max_length))
    train_ex, skipped = encode(rows)
    val_ex: list = []
    if cfg.validation_split and (ds_dir / f"{cfg.validation_split}.parquet").is_file():
        _, vrows = D.read_dataset(ds_dir, cfg.validation_split)
        val_ex, _ = encode(vrows[:cfg.eval_max_examples])
    lengths = [p.length for p in train_ex] if dpo else [len(e.ids) for e in train_ex]
    steps = D.plan(lengths, cfg.batch_size, cfg.grad_accum, cfg.epochs, cfg.max_steps, cfg.seed,
                   cfg.group_by_length)
    total = len(steps)

    weights = trainable(model)
    opt = torch.optim.AdamW(list(weights.values()), lr=lr_at(cfg, 0, total), betas=tuple(cfg.betas),
                            eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=False)
    ckpt = Checkpointer(checkpoint_folder(ws.root, cfg.checkpoint_dir, cfg.output_name), config_digest(resolved),
                        cfg.keep_checkpoints, ws.root)
    # every rank decides alike (read-only); a checkpoint is verified before any work
    recorded, loaded = resume_point(ws, ckpt) if resume else (None, None)
    if recorded is not None:
        if world.main:
            ckpt.clear()
        return recorded
    ref_s = None
    if dpo:  # reference log-probabilities of the initial policy, before a checkpoint's weights are restored
        t_ref = time.perf_counter()
        train_ref = P.reference_logps(model, train_ex, [i for s in steps for i in s], cfg, pad_id, world)
        val_ref = P.reference_logps(model, val_ex, range(len(val_ex)), cfg, pad_id, world)
        ref_s = round(time.perf_counter() - t_ref, 3)

    def evaluate() -> dict:
        if dpo:
            return P.evaluate(model, val_ex, val_ref, cfg, pad_id)
        return {"val_loss": evaluate_loss(model, val_ex, cfg, pad_id)}

    st = State()
    best: dict | None = None
    if loaded is not None:
        saved = restore(loaded, weights, opt)
        st = State(**{k: v for k, v in saved.items() if k in State.__dataclass_fields__})
        best = loaded["best"]
    elif world.main:
        ckpt.clear()
    barrier(world)
    resumed_from = st.step if loaded is not None else None
    counts = model_counts(model)

    def save_checkpoint():
        if world.main:
            ckpt.save(st.step, weights, opt, st.to_json(), best)

    recording = ws.ledger.run("train", config=resolved, inputs=inputs, seed=cfg.seed,
                              environment_extra={"torch_threads": torch.get_num_threads(),
                                                 "compiled_kernels": kernel_counts,
                                                 "device": str(device),
                                                 "device_name": device_name(device),
                                                 "world_size": world.size}) \
        if world.main else contextlib.nullcontext(None)
    with recording as run, _Signals() as sigs:
        bar = _progress(progress and world.main, total, st.step)
        session_t0, session_tokens = time.perf_counter(), 0
        try:
            while st.step < total and not st.stopped_early:
                t0 = time.perf_counter()
                idx = steps[st.step]
                n_tgt = sum(train_ex[i].n_target for i in idx)
                lr = lr_at(cfg, st.step, total)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.zero_grad(set_to_none=True)
                step_loss = 0.0
                stats = P.new_stats() if dpo else {}
                n_chosen = sum(train_ex[i].chosen.n_target for i in idx) if dpo else 0
                mbs = D.micro_batches(idx, cfg.batch_size, lengths, cfg.micro_batch_tokens)
                for mb in mbs[world.rank::world.size]:  # this process's share of the step
                    if dpo:  # the loss is already divided by the pairs of the whole step
                        step_loss += P.micro_batch(model, [train_ex[i] for i in mb], train_ref[mb], cfg.dpo,
                                                   len(idx), n_chosen, cfg.packing, pad_id, cfg.loss_chunk, stats)
                        continue
                    batch = D.collate([train_ex[i] for i in mb], cfg.packing, pad_id)
                    with segments(batch.cu_seqlens):  # also active while backward recomputes activations
                        ls = loss_sum(model, batch, cfg.loss_chunk)
                        (ls / n_tgt).backward()
                    step_loss += float(ls.detach())
                params = list(weights.values())
                all_reduce_grads(params, world)
                step_loss = all_sum(step_loss, world)
                stats = {k: all_sum(v, world) for k, v in stats.items()}
                if cfg.max_grad_norm is not None:
                    gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                else:
                    gnorm = float(torch.linalg.vector_norm(
                        torch.stack([p.grad.norm() for p in params if p.grad is not None])))
                if not math.isfinite(step_loss):
                    raise InputError(f"the loss became {step_loss} at step {st.step + 1}",
                                     hint="lower lr, or check the data for empty targets")
                opt.step()
                n_tok = sum(lengths[i] for i in idx)
                st.step += 1
                st.tokens += n_tok
                st.target_tokens += n_tgt
                st.flops += step_flops(counts, [n for i in idx for n in train_ex[i].seq_lengths] if dpo
                                       else [lengths[i] for i in idx], n_tgt)
                dt = time.perf_counter() - t0
                st.elapsed += dt
                session_tokens += n_tok
                loss = step_loss if dpo else step_loss / n_tgt
                extra = P.step_metrics(stats, len(idx), n_chosen, cfg.dpo) if dpo else {}
                if st.step % cfg.log_every == 0 or st.step == total:
                    st.history.append({"step": st.step, "loss": loss, "lr": lr, "grad_norm": gnorm,
                                       "tokens": st.tokens, "target_tokens": st.target_tokens, **extra})
                if val_ex and cfg.eval_every and (st.step % cfg.eval_every == 0 or st.step == total):
                    ev = evaluate()
                    val = ev["val_loss"]
                    st.history.append({"step": st.step, **ev})
                    if st.best_val is None or val < st.best_val:
                        st.best_val, st.best_step, st.bad_evals = val, st.step, 0
                        if cfg.early_stopping_patience:
                            best = {k: v.detach().clone() for k, v in weights.items()}
                    else:
                        st.bad_evals += 1
                        if cfg.early_stopping_patience and st.bad_evals >= cfg.early_stopping_patience:
                            st.stopped_early = True
                if bar is not None:
                    tps = session_tokens / max(1e-9, time.perf_counter() - session_t0)
                    acc = f"  acc {extra['reward_accuracy']:.2f}" if dpo else ""
                    bar.update(0, completed=st.step, description=f"loss {loss:.4f}{acc}  {tps:,.0f} tok/s")
                if any_flag(sigs.received is not None, world):
                    save_checkpoint()
                    raise KeyboardInterrupt(f"stopped by a signal after step {st.step}; "
                                            f"resume with --resume")
                if cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0 and st.step < total:
                    save_checkpoint()
        finally:
            if bar is not None:
                bar.stop()

        if not world.main:  # rank 0 writes the adapter and the run
            barrier(world)
            return ws.ledger.resolve(cfg.output_name)
        if best is not None:
            with torch.no_grad():
                for k, p in weights.items():
                    p.copy_(best[k])
        train_losses = [r["loss"] for r in st.history if "loss" in r]
        final_eval = evaluate() if val_ex else {}
        val_loss = final_eval.get("val_loss")
        facts = {"format": "finetrace-adapter/1", "base_model": base_art.digest, "base_model_ref": base_art.ref,
                 "dataset": ds_art.digest, "dataset_ref": ds_art.ref, "split": cfg.split,
                 "parent": parent_art.digest if parent_art else None, **method, **ident,
                 "objective": cfg.objective, "seed": cfg.seed, "steps": st.step,
                 "final_loss": train_losses[-1] if train_losses else None, "val_loss": val_loss,
                 "config": resolved}
        with tempfile.TemporaryDirectory(dir=ws.root / "cache", prefix=scratch_prefix(ws.root, ".train-")) as tmp:
            out = Path(tmp) / "adapter"
            write_output(model, tok, out, facts, base_art.digest)
            write_metrics(out / "metrics.jsonl", st.history)
            plot_loss(out / "loss_curve.png", st.history, f"{cfg.output_name}: {method['method']} on {ds_art.ref}",
                      f"DPO loss ({cfg.dpo.loss_type}, per pair)" if cfg.objective == "dpo" else
                      "loss (nats / target token)")
            digest = ws.store.put_dir(out)
        kind = "model" if method["method"] == "full" else "adapter"
        art = run.output(kind, digest, name=cfg.output_name, metadata={
            "base_model": base_art.digest, "method": method["method"], "r": method.get("r"),
            "target_modules": method.get("target_modules"), "parent": facts["parent"], **ident})
        wall = st.elapsed
        run.metrics.update({
            "steps": st.step, "tokens": st.tokens, "target_tokens": st.target_tokens,
            "examples": len(train_ex), "skipped_too_long": skipped, "wall_time_s": round(wall, 3),
            "tokens_per_s": round(st.tokens / wall, 2) if wall else None,
            "final_loss": facts["final_loss"], "val_loss": val_loss, "best_val_loss": st.best_val,
            "best_step": st.best_step, "stopped_early": st.stopped_early, "resumed_from_step": resumed_from,
            "flops_estimate": st.flops, "achieved_flops_per_s": round(st.flops / wall, 1) if wall else None,
            "energy_wh_estimate": round(wall * cfg.assumed_watts / 3600, 6), "assumed_watts": cfg.assumed_watts,
        })
        if dpo:
            last = next((r for r in reversed(st.history) if "reward_accuracy" in r), {})
            run.metrics.update({
                "pairs": len(train_ex), "final_reward_accuracy": last.get("reward_accuracy"),
                "final_reward_margin": last.get("reward_margin"),
                "val_reward_accuracy": final_eval.get("val_reward_accuracy"),
                "val_reward_margin": final_eval.get("val_reward_margin"), "reference_pass_s": ref_s})
    ckpt.clear()
    ws.checkpoint()
    barrier(world)
    return art


def write_output(model, tok, out: Path, facts: dict, base_digest: str) -> None:
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
            model.save_pretrained(tmp)
            # peft writes target_modules from a set (order varies with PYTHONHASHSEED): sort, so the
            # same training gives the same bytes in any process
            pcfg = json.loads((Path(tmp) / "adapter_config.json").read_text())
            for key, value in pcfg.items():
                if isinstance(value, list) and all(isinstance(v, str) for v in value):
                    pcfg[key] = sorted(value)
            write_bytes(out / "adapter_config.json", (json.dumps(pcfg, indent=2, sort_keys=True) + "\n").encode())
            write_bytes(out / "adapter_model.safetensors", (Path(tmp) / "adapter_model.safetensors").read_bytes())
    write_bytes(out / ADAPTER_META, (json.dumps(facts, indent=2, sort_keys=True) + "\n").encode())
