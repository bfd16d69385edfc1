"""The SFT loss: output layer applied only where a target is predicted, cross-entropy in chunks.

Prompts carry no loss, and the output layer (hidden x vocab) is about a fifth of a small model's FLOPs,
so the final hidden states are gathered at the positions that predict a target and only those go through
the output layer. ``LinearCrossEntropy`` then walks the selected rows in chunks, computing the loss and
its gradients (w.r.t. the hidden states, and the output weight if it trains) chunk by chunk, so the
(batch x length x vocab) logits tensor never exists; only one (chunk x vocab) block at a time. A frozen
output weight stored narrower than the hidden states (bf16 on a quantised base) is widened one block of
vocabulary rows at a time (``models.quant.widened_linear``), in chunks of at most a 64 MiB logits block.

For a row h and target y with logits z = W h (+ b):
    loss = logsumexp(z) - z_y,     dloss/dz = softmax(z) - onehot(y),   dh = W^T dz,   dW = dz h^T

The step loss is ``sum of per-token losses / real target tokens of the whole optimiser step`` (all
micro-batches, all processes), so gradient accumulation gives the same update as one big batch.
"""

from __future__ import annotations

import torch

from ..models.quant import logits_capped, loss_rows, widened_linear, widened_matmul
from .attention import segments


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of CE(h W^T + b, y), computed in chunks; gradients are formed in the forward pass."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk: int):  # h (n, H), weight (V, H), targets (n,)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if (need_b and bias is not None) else None
        chunk = loss_rows(chunk, weight.shape[0], logits_capped(h, weight))
        # one (chunk, V) logits buffer for every chunk: a fresh one per chunk faults in page by page
        block = h.new_empty((min(chunk, h.shape[0]), weight.shape[0]))
        for s in range(0, h.shape[0], chunk):
            hc, yc = h[s : s + chunk], targets[s : s + chunk]
            z = widened_linear(hc, weight, bias, out=block[: len(hc)]).float()  # (c, V); a bf16 head widened in blocks
            rows = torch.arange(len(yc), device=z.device)
            # logsumexp by hand, in place: 4 passes over the (c, V) block and no second block allocated
            z_y = z[rows, yc]
            m = z.amax(dim=-1)
            z.sub_(m[:, None]).exp_()  # exp(z - max)
            se = z.sum(dim=-1)
            total += (m + se.log() - z_y).sum()  # lse - z_y
            if need_h or need_w or need_b:
                dz = z.div_(se[:, None])  # softmax, in place
                dz[rows, yc] -= 1.0
                dz = dz.to(h.dtype)
                if need_h:
                    grad_h[s : s + chunk] = widened_matmul(dz, weight)
                if need_w:
                    grad_w.addmm_(dz.t(), hc)
                if grad_b is not None:
                    grad_b += dz.sum(0)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.has = (grad_h is not None, grad_w is not None, grad_b is not None)
        return total

    @staticmethod
    def backward(ctx, g):
        saved = list(ctx.saved_tensors)
        out = []
        for has in ctx.has:
            out.append(saved.pop(0) * g if has else None)
        return out[0], out[1], out[2], None, None


def parts(model):
    """(decoder backbone, output layer) of a causal LM, a PEFT wrapper of one included."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = lm.config
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(cfg, attr, None) not in (None, 1.0):
            raise NotImplementedError(f"models with {attr} are not supported by the chunked loss yet")
    return lm.base_model, lm.get_output_embeddings()


# duplicates: alike reference_loss_sum on purpose (the hidden-state and the logits forward of the same packed batch).
def loss_sum(model, batch, chunk: int = 1024) -> torch.Tensor:
    """Sum of the per-target-token cross-entropy of one micro-batch (divide by the step's token count)."""
    backbone, head = parts(model)
    batch = batch.to(head.weight.device)
    with segments(batch.cu_seqlens):
        hidden = backbone(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=batch.attention_mask,
            use_cache=False,
        ).last_hidden_state  # (B, T, H)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.loss_index)  # (n, H)
    return LinearCrossEntropy.apply(h, head.weight, head.bias, batch.targets, chunk)


# duplicates: alike loss_sum on purpose (the hidden-state and the logits forward of the same packed batch).
def reference_loss_sum(model, batch) -> torch.Tensor:
    """The textbook computation (full logits, standard cross-entropy) that ``loss_sum`` must equal."""
    with segments(batch.cu_seqlens):
        logits = model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=batch.attention_mask,
            use_cache=False,
        ).logits  # (B, T, V)
    flat = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.loss_index)
    return torch.nn.functional.cross_entropy(flat.float(), batch.targets, reduction="sum")
