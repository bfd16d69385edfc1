"""A fused LoRA linear layer for training: the adapter's update folded into the base layer's GEMMs.

peft computes ``y = base(x) + lora_B(lora_A(dropout(x))) * scaling``: besides the GEMMs that costs a
multiplication and an addition over the whole (tokens x out_features) output, and in the backward pass
another multiplication, an addition of the two input gradients (tokens x in_features) and the autograd
bookkeeping of five nodes. On a CPU those element-wise passes over memory were ~15% of a LoRA step on
SmolLM2. Here one autograd node does the same arithmetic with every addition inside a GEMM (``addmm``'s
accumulate) and the scaling applied to the rank-r tensor only:

    forward:   h = x A^T            (n x r)        y = x W^T + b;   y += (s h) B^T
    backward:  dB = g^T (s h)       dh = s (g B)   dA = dh^T x      dx = g W;  dx += dh A

On a 4-bit bitsandbytes base (QLoRA) the same node takes the packed NF4/FP4 weight and dequantises it
to the compute dtype where it is used (``W = dequant(Wq)``, once in forward, once in backward, one layer
at a time), which is what bitsandbytes' own matmul does for a batch of tokens; only the packed weight is
kept for backward. On a CPU, W is written by bitsandbytes' own kernel into a buffer reused from layer to
layer (``models.dequant``): a fresh 64 MB tensor per use faulted in page by page and cost
more than the dequantisation. 8-bit bases keep peft's forward (bitsandbytes' int8 matmul quantises activations too,
so a dequantised GEMM would compute something else).

The weights stay peft's own parameters (``lora_A.default.weight``...), so saving, loading and the PEFT
format are unchanged; only ``forward`` of each eligible ``peft`` LoRA ``Linear`` is replaced, and it
falls back to peft's own forward whenever anything else is asked of it (adapter disabled or merged,
several adapters, DoRA, dropout, mixed batches), so a reference pass with ``disable_adapter()`` still works.
"""

from __future__ import annotations

import types

import torch


class LoraLinearFn(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T with W and b frozen, A and B trained; ``dequant(weight)`` gives W when
    the stored weight is quantised (None: it is W)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, dequant=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        hs = torch.mm(x2, lora_a.t()).mul_(scale)  # (n, r), already scaled
        w = dequant(weight) if dequant is not None else weight  # (out, in)
        y = torch.addmm(bias, x2, w.t()) if bias is not None else torch.mm(x2, w.t())
        y.addmm_(hs, lora_b.t())
        if dequant is not None:
            dequant.release(w)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, hs)
        ctx.scale = scale
        ctx.shape = shape
        ctx.dequant = dequant
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, lora_a, lora_b, hs = ctx.saved_tensors
        if ctx.dequant is not None:
            weight = ctx.dequant(weight)
        g = grad.reshape(-1, grad.shape[-1])
        grad_b = torch.mm(g.t(), hs) if ctx.needs_input_grad[4] else None
        gh = torch.mm(g, lora_b).mul_(ctx.scale)  # (n, r)
        grad_a = torch.mm(gh.t(), x2) if ctx.needs_input_grad[3] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, weight).addmm_(gh, lora_a).view(ctx.shape)
        if ctx.dequant is not None:
            ctx.dequant.release(weight)
        return grad_x, None, None, grad_a, grad_b, None, None


_SCRATCH_DTYPES = (torch.float32, torch.bfloat16)  # what models.dequant writes into a reused CPU buffer


class _Dequantizer:
    """For a bitsandbytes 4-bit layer: ``self(packed)`` is W in ``dtype`` (out, in), written into a reused
    buffer (``models.dequant.SCRATCH``) that ``release`` gives back once the GEMMs that read it are done."""

    def __init__(self, state, dtype):
        self.state, self.dtype = state, dtype

    def __call__(self, packed):
        from ..models.dequant import SCRATCH, dequantize_4bit_into

        if packed.device.type != "cpu" or self.dtype not in _SCRATCH_DTYPES:  # CUDA: its caching allocator reuses
            from bitsandbytes.functional import dequantize_4bit

            return dequantize_4bit(packed, self.state).to(self.dtype)
        return dequantize_4bit_into(packed, self.state, SCRATCH.take(tuple(self.state.shape), self.dtype, "cpu"))

    @staticmethod
    def release(w) -> None:
        from ..models.dequant import SCRATCH

        if w.device.type == "cpu" and w.dtype in _SCRATCH_DTYPES:
            SCRATCH.give(w)


def _dequantizer(base, dtype):
    """For a bitsandbytes 4-bit layer: its ``_Dequantizer`` to ``dtype``; else None."""
    state = getattr(base.weight, "quant_state", None)
    return None if state is None else _Dequantizer(state, dtype)


def _is_4bit(base) -> bool:
    return getattr(base.weight, "quant_state", None) is not None


def _eligible(module) -> bool:
    base = getattr(module, "base_layer", None)
    if not isinstance(base, torch.nn.Linear) or base.weight.requires_grad:
        return False
    if base.weight.dtype in (torch.int8, torch.uint8) and not _is_4bit(base):
        return False  # 8-bit: bitsandbytes' own matmul
    if base.bias is not None and base.bias.requires_grad:
        return False
    return not getattr(module, "lora_variant", None)  # DoRA and other variants keep peft's forward


def _fused_forward(self, x, *args, **kwargs):
    """peft's LoRA Linear forward, fused when only one plain LoRA adapter is active."""
    active = self.active_adapters
    if (
        args
        or kwargs
        or self.disable_adapters
        or self.merged
        or len(active) != 1
        or active[0] not in self.lora_A
        or active[0] in getattr(self, "lora_variant", {})
    ):
        return self._peft_forward(x, *args, **kwargs)
    name = active[0]
    drop = self.lora_dropout[name]
    if not isinstance(drop, torch.nn.Identity) and (drop.p > 0 and self.training):
        return self._peft_forward(x, *args, **kwargs)
    base, a, b = self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight
    dequant = None
    if _is_4bit(base):
        if base.weight.quant_state.dtype != x.dtype or getattr(
            base.weight.quant_state, "packing_format_for_cpu", False
        ):
            return self._peft_forward(x, *args, **kwargs)
        dequant = _dequantizer(base, x.dtype)
    elif base.weight.dtype != x.dtype:
        return self._peft_forward(x, *args, **kwargs)
    if a.dtype != x.dtype:  # fp32 adapter on a bf16 base: compute in bf16, gradients reach the fp32 weights
        a, b = a.to(x.dtype), b.to(x.dtype)
    weight = base.weight.data if dequant is not None else base.weight
    return LoraLinearFn.apply(x, weight, base.bias, a, b, float(self.scaling[name]), dequant)


def _lora_types() -> tuple:
    from peft.tuners.lora.layer import Linear as LoraLinear

    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # no bitsandbytes
        return (LoraLinear,)
    return (LoraLinear, Linear4bit)


def fuse_lora(model) -> int:
    """Route every eligible peft LoRA ``Linear`` of ``model`` through ``LoraLinearFn``; returns how many."""
    types_ = _lora_types()
    n = 0
    for module in model.modules():
        if type(module) in types_ and _eligible(module) and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n
