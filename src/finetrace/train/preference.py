"""The DPO objective: preference pairs, sequence log-probabilities in chunks, the reference pass, the loss.

Direct Preference Optimization (Rafailov et al. 2023) learns from pairs (prompt x, chosen y_w, rejected
y_l) without a reward model. With log pi the sequence log-probability under the adapter being trained
and log pi_ref under the *reference* (the policy at the start of training: the base for a fresh adapter,
whose LoRA B starts at zero; the parent adapter for ``init_from``):

    r_w = beta (log pi(y_w|x) - log pi_ref(y_w|x))       the implicit reward of the chosen answer
    r_l = beta (log pi(y_l|x) - log pi_ref(y_l|x))       ... and of the rejected one
    sigmoid:  -(1 - s) log sigmoid(r_w - r_l) - s log sigmoid(r_l - r_w)     (s: label smoothing)
    ipo:      ((r_w - r_l) / beta - 1 / (2 beta))^2       (log-probabilities averaged per token, as TRL)
    hinge:    max(0, 1 - (r_w - r_l))

plus, when ``sft_weight`` > 0, that weight times the NLL per chosen target token (RPO). The step loss is
the sum over pairs divided by the pairs of the whole optimiser step (all micro-batches, all processes),
so gradient accumulation and torchrun give the same update as one big batch.

Each pair becomes two sequences, ``prompt + chosen + eos`` and ``prompt + rejected + eos``, packed
into one row next to each other (a pair never straddles micro-batches). A sequence's log-probability is
the sum of its target tokens' log-probabilities (eos included). DPO's loss is not linear in those, so
the SFT trick of forming gradients in the forward pass does not apply; ``TokenLogProbs`` instead returns
per-position log-probabilities and recomputes each chunk's logits in backward (saving only h, W, the
targets and one log-sum-exp per row), so the full logits tensor never exists in either pass.

The reference log-probabilities are computed once, before the first step, in a no-grad pass over the
pairs the run will use (TRL's ``precompute_ref_log_probs``): no second model in memory. The pass is a
pure function of the initial weights and the data, so ``--resume`` recomputes it bit for bit before
restoring the checkpoint's weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data.schemas import to_example
from ..errors import ConfigError, InputError
from ..models.quant import logits_capped, loss_rows, widened_linear, widened_matmul
from . import data as D
from .attention import segments
from .loss import parts

STATS = ("loss", "nll", "correct", "margin", "reward_chosen", "reward_rejected")


def check_objective(objective: str, schema: str | None) -> None:
    """Refuse a dataset that does not fit the objective (ConfigError naming ``objective``)."""
    if objective == "dpo" and schema != "preference":
        raise ConfigError(
            f"objective dpo needs a preference dataset (prompt, chosen, rejected), and this one is a {schema} dataset",
            field="objective",
            hint="import pairs with `finetrace data import PAIRS.jsonl --schema preference`, or "
            "set objective: sft for this dataset",
        )
    if objective == "sft" and schema == "preference":
        raise ConfigError(
            "this is a preference dataset (prompt, chosen, rejected): set objective: dpo to learn from the pairs",
            field="objective",
            hint="for SFT on the chosen answers, import the same file as a completion dataset: "
            "`finetrace data import PAIRS.jsonl --schema completion --map completion=chosen`",
        )


@dataclass(frozen=True)
class Pair:
    """One preference pair as two token sequences sharing the prompt."""

    chosen: D.Encoded
    rejected: D.Encoded

    @property
    def n_target(self) -> int:
        return self.chosen.n_target + self.rejected.n_target

    @property
    def length(self) -> int:
        return len(self.chosen.ids) + len(self.rejected.ids)

    @property
    def seq_lengths(self) -> list[int]:
        return [len(self.chosen.ids), len(self.rejected.ids)]


def encode_pairs(tokenizer, rows: list[dict], max_length: int) -> tuple[list[Pair], int]:
    """Encode preference rows; returns (pairs, number skipped because a sequence exceeds ``max_length``)."""
    out, skipped = [], 0
    for i, row in enumerate(rows):
        try:
            ex = to_example(row, "preference")
        except (KeyError, ValueError) as exc:
            raise InputError(f"row {i} cannot be rendered as a preference pair: {exc}") from None
        pair = Pair(D.encode(tokenizer, ex.messages, ex.target), D.encode(tokenizer, ex.messages, ex.rejected))
        if max(pair.seq_lengths) > max_length:
            skipped += 1
            continue
        out.append(pair)
    return out, skipped


def collate_pairs(pairs: list[Pair], packing: bool, pad_id: int) -> tuple[D.Batch, torch.Tensor]:
    """A batch of sequences [c0, r0, c1, r1, ...] and, per target position, its sequence index (n,)."""
    seqs = [s for p in pairs for s in (p.chosen, p.rejected)]
    batch = D.collate(seqs, packing, pad_id)
    seq = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor([s.n_target for s in seqs]))
    return batch, seq


# -- log-probabilities ---------------------------------------------------------------------------
class TokenLogProbs(torch.autograd.Function):
    """log softmax(h W^T + b)[y] per row, in chunks; backward recomputes each chunk's logits.

    For a row with logits z and target y: logp = z_y - logsumexp(z), d logp / dz = onehot(y) - softmax(z).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk: int):  # h (n, H), weight (V, H), targets (n,)
        n = h.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=h.device)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        chunk = loss_rows(chunk, weight.shape[0], logits_capped(h, weight))
        for s in range(0, n, chunk):
            z = widened_linear(h[s : s + chunk], weight, bias).float()  # (c, V)
            lse[s : s + chunk] = torch.logsumexp(z, dim=-1)
            out[s : s + chunk] = z.gather(1, targets[s : s + chunk, None]).squeeze(1) - lse[s : s + chunk]
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, g):  # g (n,)
        h, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if (need_b and bias is not None) else None
        g = g.float()
        for s in range(0, h.shape[0], ctx.chunk):
            hc, yc, gc = h[s : s + ctx.chunk], targets[s : s + ctx.chunk], g[s : s + ctx.chunk]
            z = widened_linear(hc, weight, bias).float()  # (c, V), recomputed
            dz = torch.exp(z.sub_(lse[s : s + ctx.chunk, None])).mul_(-gc[:, None])  # -g softmax(z), in place
            dz[torch.arange(len(yc), device=dz.device), yc] += gc
            dz = dz.to(h.dtype)
            if need_h:
                grad_h[s : s + ctx.chunk] = widened_matmul(dz, weight)
            if need_w:
                grad_w.addmm_(dz.t(), hc)
            if grad_b is not None:
                grad_b += dz.sum(0)
        return grad_h, grad_w, grad_b, None, None


def sequence_logps(model, batch: D.Batch, seq: torch.Tensor, n_seqs: int, chunk: int = 1024) -> torch.Tensor:
    """Sum of target-token log-probabilities per sequence (n_seqs,); call inside ``segments(batch.cu_seqlens)``."""
    backbone, head = parts(model)
    batch = batch.to(head.weight.device)
    seq = seq.to(head.weight.device)
    hidden = backbone(
        input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state  # (B, T, H)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.loss_index)  # (n, H)
    tok = TokenLogProbs.apply(h, head.weight, head.bias, batch.targets, chunk)  # (n,)
    return torch.zeros(n_seqs, dtype=tok.dtype, device=tok.device).index_add(0, seq, tok)


# -- the loss --------------------------------------------------------------------------------------
def pair_losses(policy: torch.Tensor, ref: torch.Tensor, n_tokens: torch.Tensor, params) -> tuple:
    """Per-pair loss and implicit rewards from (P, 2) [chosen, rejected] log-probabilities.

    Returns (losses (P,), chosen rewards (P,), rejected rewards (P,)); ``params`` is a ``DpoParams``.
    """
    ref, n_tokens = ref.to(policy.device), n_tokens.to(policy.device)
    if params.loss_type == "ipo":  # IPO compares per-token averages (TRL does the same)
        policy, ref = policy / n_tokens, ref / n_tokens
    rewards = params.beta * (policy - ref.to(policy.dtype))  # (P, 2)
    r_w, r_l = rewards[:, 0], rewards[:, 1]
    logits = r_w - r_l  # beta z
    if params.loss_type == "sigmoid":
        s = params.label_smoothing
        losses = -(1 - s) * torch.nn.functional.logsigmoid(logits) - s * torch.nn.functional.logsigmoid(-logits)
    elif params.loss_type == "ipo":
        losses = (logits / params.beta - 1 / (2 * params.beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - logits)
    return losses, r_w, r_l


def new_stats() -> dict[str, float]:
    """Sums a step accumulates (the same keys on every process, in a fixed order)."""
    return {k: 0.0 for k in STATS}


def micro_batch(
    model,
    pairs: list[Pair],
    ref: torch.Tensor,
    params,
    n_pairs: int,
    n_chosen_tokens: int,
    packing: bool,
    pad_id: int,
    chunk: int,
    stats: dict[str, float],
    weight: float = 1.0,
) -> float:
    """Forward and backward of one micro-batch of pairs; adds to ``stats``, returns its share of the step loss.

    ``ref`` (k, 2) holds the reference log-probabilities of ``pairs``; ``n_pairs`` and ``n_chosen_tokens``
    count the whole optimiser step (all micro-batches, all processes); ``weight`` scales the loss (0: a pass
    that only keeps collectives in step, as FSDP needs).
    """
    batch, seq = collate_pairs(pairs, packing, pad_id)
    n_tok = torch.tensor([[p.chosen.n_target, p.rejected.n_target] for p in pairs], dtype=torch.float32)
    with segments(batch.cu_seqlens):  # also active while backward recomputes activations
        logps = sequence_logps(model, batch, seq, 2 * len(pairs), chunk).view(-1, 2)  # (k, 2)
        losses, r_w, r_l = pair_losses(logps, ref, n_tok, params)
        objective = losses.sum() / n_pairs
        nll = -logps[:, 0].sum()
        if params.sft_weight:
            objective = objective + params.sft_weight * nll / n_chosen_tokens
        (objective * weight).backward()
    _add_stats(stats, losses, nll, r_w, r_l)
    return float(objective.detach()) * weight


def _add_stats(stats: dict, losses, nll, r_w, r_l) -> None:
    stats["loss"] += float(losses.detach().sum())
    stats["nll"] += float(nll.detach())
    stats["correct"] += float((r_w > r_l).sum())
    stats["margin"] += float((r_w - r_l).detach().sum())
    stats["reward_chosen"] += float(r_w.detach().sum())
    stats["reward_rejected"] += float(r_l.detach().sum())


def step_metrics(stats: dict[str, float], n_pairs: int, n_chosen_tokens: int, params, prefix: str = "") -> dict:
    """Means over the pairs of a step (or of the validation set) for the metrics history."""
    out = {
        f"{prefix}reward_accuracy": stats["correct"] / n_pairs,
        f"{prefix}reward_margin": stats["margin"] / n_pairs,
        f"{prefix}reward_chosen": stats["reward_chosen"] / n_pairs,
        f"{prefix}reward_rejected": stats["reward_rejected"] / n_pairs,
    }
    if params.sft_weight:
        out[f"{prefix}dpo_loss"] = stats["loss"] / n_pairs
        out[f"{prefix}nll"] = stats["nll"] / max(1, n_chosen_tokens)
    return out


# -- the reference pass, evaluation ------------------------------------------------------------------
def reference_logps(model, pairs: list[Pair], indices, cfg, pad_id: int, world) -> torch.Tensor:
    """Reference log-probabilities (len(pairs), 2) of the pairs in ``indices`` (NaN elsewhere), no gradients.

    The pairs are grouped as training groups them (batch_size, micro_batch_tokens) in index order, so the
    result is a pure function of the weights, the data and the config; under torchrun each process
    computes every N-th group and the results are summed (a sum with zeros is exact).
    """
    order = sorted(set(indices))
    lengths = [p.length for p in pairs]
    groups = D.micro_batches(order, cfg.batch_size, lengths, cfg.micro_batch_tokens)
    vals = torch.zeros(len(pairs), 2, dtype=torch.float32)
    have = torch.zeros(len(pairs), dtype=torch.float32)
    was = model.training
    model.eval()
    with torch.no_grad():
        for g in groups[world.rank :: world.size]:
            batch, seq = collate_pairs([pairs[i] for i in g], cfg.packing, pad_id)
            with segments(batch.cu_seqlens):
                vals[g] = sequence_logps(model, batch, seq, 2 * len(g), cfg.loss_chunk).view(-1, 2).float().cpu()
            have[g] = 1.0
    model.train(was)
    if world.size > 1:
        import torch.distributed as dist

        from .distributed import collective_device

        vals, have = vals.to(collective_device()), have.to(collective_device())
        dist.all_reduce(vals, op=dist.ReduceOp.SUM)
        dist.all_reduce(have, op=dist.ReduceOp.SUM)
        vals, have = vals.cpu(), have.cpu()
    vals[have == 0] = math.nan
    return vals


def evaluate(model, pairs: list[Pair], ref: torch.Tensor, cfg, pad_id: int) -> dict:
    """Validation DPO loss (mean per pair) and reward accuracy/margin over ``pairs`` (no gradients)."""
    was = model.training
    model.eval()
    stats = new_stats()
    with torch.no_grad():
        for s in range(0, len(pairs), cfg.batch_size):
            chunk = pairs[s : s + cfg.batch_size]
            batch, seq = collate_pairs(chunk, cfg.packing, pad_id)
            n_tok = torch.tensor([[p.chosen.n_target, p.rejected.n_target] for p in chunk], dtype=torch.float32)
            with segments(batch.cu_seqlens):
                logps = sequence_logps(model, batch, seq, 2 * len(chunk), cfg.loss_chunk).view(-1, 2)
            losses, r_w, r_l = pair_losses(logps, ref[s : s + cfg.batch_size], n_tok, cfg.dpo)
            _add_stats(stats, losses, -logps[:, 0].sum(), r_w, r_l)
    model.train(was)
    n, n_chosen = max(1, len(pairs)), sum(p.chosen.n_target for p in pairs)
    loss = stats["loss"] / n + (cfg.dpo.sft_weight * stats["nll"] / max(1, n_chosen) if cfg.dpo.sft_weight else 0.0)
    return {"val_loss": loss, **step_metrics(stats, n, n_chosen, cfg.dpo, prefix="val_")}
