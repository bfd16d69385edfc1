"""Training objectives behind one small interface, so the loop in ``loop.py`` has no per-objective branches.

An objective owns what differs between SFT and DPO: how rows become examples, what a micro-batch's
forward and backward compute, how a step's sums become the logged loss, validation, and the run's extra
metrics. The loop owns everything else (data order, accumulation, gradient reduction, clipping, the
optimiser, checkpoints, signals, recording).

    obj = make_objective(cfg, tok, dataset, pad_id)     # dataset: its dataset.json
    train_ex, skipped = obj.encode(rows)
    obj.prepare(model, train_ex, val_ex, used_indices, world)     # DPO: the reference pass
    step = obj.start_step(indices)                                # counts of the whole step
    for mb in this process's micro-batches:  step_loss += obj.micro_batch(model, step, mb)
    loss, extra = obj.summary(step, all_sum(step_loss), all_sum(step.stats))

Every micro-batch's loss is divided by a count of the *whole* optimiser step (target tokens for SFT,
pairs for DPO), so accumulation and data parallelism give the update of one big batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import data as D
from . import preference as P
from .attention import segments
from .loss import loss_sum


@dataclass
class Step:
    """Counts of one optimiser step (all micro-batches, all processes) and the sums it accumulates."""

    indices: list[int]
    n_target: int
    n_chosen: int = 0
    stats: dict[str, float] = field(default_factory=dict)


def evaluate_loss(model, examples: list[D.Encoded], cfg, pad_id: int) -> float:
    """Mean CE per target token over ``examples`` (no gradients)."""
    import torch

    was = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(examples), cfg.batch_size):
            batch = D.collate(examples[s : s + cfg.batch_size], cfg.packing, pad_id)
            total += float(loss_sum(model, batch, cfg.loss_chunk))
            n += batch.n_targets
    model.train(was)
    return total / max(1, n)


class SFT:
    """Cross-entropy on the target tokens (and the end-of-turn token) of completion/chat/classification rows."""

    name = "sft"
    loss_label = "loss (nats / target token)"

    def __init__(self, cfg, tok, dataset: dict, pad_id: int):
        self.cfg, self.tok, self.pad_id = cfg, tok, pad_id
        self.schema, self.labels = dataset.get("schema"), dataset.get("labels")
        self.prompt_format = dataset.get("prompt_format")
        self.train_ex: list = []
        self.val_ex: list = []

    def encode(self, rows: list[dict]):
        return D.encode_rows(
            self.tok, rows, self.schema, self.labels, self.cfg.max_length, self.cfg.loss_turns, self.prompt_format
        )

    @staticmethod
    def length(ex) -> int:
        return len(ex.ids)

    @staticmethod
    def seq_lengths(ex) -> list[int]:
        return [len(ex.ids)]

    def prepare(self, model, train_ex, val_ex, used, world) -> float | None:
        """Keep the examples; returns the seconds of any pass made before the first step (none here)."""
        self.train_ex, self.val_ex = train_ex, val_ex
        return None

    def start_step(self, indices: list[int]) -> Step:
        return Step(indices, sum(self.train_ex[i].n_target for i in indices))

    def micro_batch(self, model, step: Step, mb: list[int], weight: float = 1.0) -> float:
        """Forward + backward of micro-batch ``mb``; returns its summed CE (``weight`` 0: a no-op pass)."""
        batch = D.collate([self.train_ex[i] for i in mb], self.cfg.packing, self.pad_id)
        with segments(batch.cu_seqlens):  # also active while backward recomputes activations
            ls = loss_sum(model, batch, self.cfg.loss_chunk)
            (ls / step.n_target * weight).backward()
        return float(ls.detach()) * weight

    def summary(self, step: Step, loss: float, stats: dict) -> tuple[float, dict]:
        return loss / step.n_target, {}

    def evaluate(self, model) -> dict:
        return {"val_loss": evaluate_loss(model, self.val_ex, self.cfg, self.pad_id)}

    def progress(self, extra: dict) -> str:
        return ""

    def run_metrics(self, history: list[dict], final_eval: dict) -> dict:
        return {}


class DPO(SFT):
    """Direct Preference Optimization on (prompt, chosen, rejected) pairs (the maths in ``preference``)."""

    name = "dpo"

    def __init__(self, cfg, tok, dataset: dict, pad_id: int):
        super().__init__(cfg, tok, dataset, pad_id)
        self.loss_label = f"DPO loss ({cfg.dpo.loss_type}, per pair)"
        self.train_ref = self.val_ref = None
        self.ref_seconds: float | None = None

    def encode(self, rows):
        return P.encode_pairs(self.tok, rows, self.cfg.max_length)

    @staticmethod
    def length(ex) -> int:
        return ex.length

    @staticmethod
    def seq_lengths(ex) -> list[int]:
        return ex.seq_lengths

    def prepare(self, model, train_ex, val_ex, used, world) -> float:
        """The reference log-probabilities of the initial policy (before a checkpoint's weights are restored)."""
        self.train_ex, self.val_ex = train_ex, val_ex
        t0 = time.perf_counter()
        self.train_ref = P.reference_logps(model, train_ex, used, self.cfg, self.pad_id, world)
        self.val_ref = P.reference_logps(model, val_ex, range(len(val_ex)), self.cfg, self.pad_id, world)
        self.ref_seconds = round(time.perf_counter() - t0, 3)
        return self.ref_seconds

    def start_step(self, indices):
        return Step(
            indices,
            sum(self.train_ex[i].n_target for i in indices),
            sum(self.train_ex[i].chosen.n_target for i in indices),
            P.new_stats(),
        )

    def micro_batch(self, model, step, mb, weight: float = 1.0):
        # the loss is already divided by the pairs of the whole step; weight 0 scales the stats away too
        stats = P.new_stats()
        cfg = self.cfg
        loss = P.micro_batch(
            model,
            [self.train_ex[i] for i in mb],
            self.train_ref[mb],
            cfg.dpo,
            len(step.indices),
            step.n_chosen,
            cfg.packing,
            self.pad_id,
            cfg.loss_chunk,
            stats,
            weight,
        )
        for k, v in stats.items():
            step.stats[k] += v * weight
        return loss

    def summary(self, step, loss, stats):
        return loss, P.step_metrics(stats, len(step.indices), step.n_chosen, self.cfg.dpo)

    def evaluate(self, model):
        return P.evaluate(model, self.val_ex, self.val_ref, self.cfg, self.pad_id)

    def progress(self, extra):
        return f"  acc {extra['reward_accuracy']:.2f}"

    def run_metrics(self, history, final_eval):
        last = next((r for r in reversed(history) if "reward_accuracy" in r), {})
        return {
            "pairs": len(self.train_ex),
            "final_reward_accuracy": last.get("reward_accuracy"),
            "final_reward_margin": last.get("reward_margin"),
            "val_reward_accuracy": final_eval.get("val_reward_accuracy"),
            "val_reward_margin": final_eval.get("val_reward_margin"),
            "reference_pass_s": self.ref_seconds,
        }


OBJECTIVES = {"sft": SFT, "dpo": DPO}


def make_objective(cfg, tok, dataset: dict, pad_id: int) -> SFT:
    """The objective of ``cfg.objective`` for a dataset (its ``dataset.json``: schema, labels, prompt format;
    ConfigError when objective and schema do not fit)."""
    P.check_objective(cfg.objective, dataset.get("schema"))
    return OBJECTIVES[cfg.objective](cfg, tok, dataset, pad_id)
