"""Half-size weights for the lean decode forward: fp16 storage, fp32 compute, q/k/v and gate/up fused.

Why: decoding one row reads every weight once per token, so on a CPU the single stream is bound by
memory bandwidth (fp32 SmolLM2-135M: 540 MB a token), and small-batch fp32 GEMMs (MKL) run far below
the matmul ceiling on these shapes, the 576 x 49152 output layer worst of all. fbgemm's fp16 GEMM
(``torch.ops.quantized.linear_dynamic_fp16``) keeps the weights as fp16 and converts them to fp32 in
registers: activations, accumulation and outputs stay fp32, so each output is

    y = x W16^T + b        W16 = fp16(W) (round to nearest), x and the sum in fp32

i.e. exactly the fp32 model with its Linear weights and embedding rounded to fp16 (norms kept fp32):
``round_to_fp16`` rounds the model itself, so that its own forward (and label scoring) computes the
same numbers; and a row's result does not depend on
the rows it is batched with beyond fp32 summation order (as with fp32 GEMMs). No activation is
quantised. Measured here (CPU time, one thread, weights streamed from memory): about 2x faster than
``F.linear`` on the projections at batch 1 and 16, and 2x on the output layer.

The packed copies are built once per base model (about half the fp32 size) and rebuilt only when a
weight changes (its storage or version counter); q/k/v and gate/up are concatenated into one GEMM
each at packing time, so fusing costs no per-request copy. LoRA deltas are computed in fp32 (their
matrices rounded to fp16 values as well) and added to the fused output's slices. Only CPU tensors with
fbgemm's fp16 kernels available are packed; ``decode_weights`` says which precision a model decodes with, the same answer for evaluation, serving
and ``generate``.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def fp16_kernels() -> bool:
    """True when this torch build has fbgemm's fp16-weight GEMM (x86 CPU builds)."""
    try:
        w = torch.ones(8, 8)
        p = torch.ops.quantized.linear_prepack_fp16(w, None)
        return bool(torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 8), p).sum() == 64)
    except (RuntimeError, AttributeError):
        return False


def decode_weights(model) -> str:
    """``"fp16"`` (fp16 storage, fp32 compute) for an fp32 model on the CPU where the kernels exist, else ``"fp32"``."""
    try:
        params = list(model.parameters())
    except AttributeError:
        return "fp32"
    ok = params and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    return "fp16" if ok and fp16_kernels() else "fp32"


def round_to_fp16(model) -> None:
    """Round ``model``'s Linear weights and embeddings to fp16 values (still fp32 tensors, the same
    parameters), its LoRA matrices included.

    So that every path that decodes on this model computes on the same numbers as the packed fp16
    copies: the lean forward, the model's own forward (PEFT's mixed batches, DoRA, an architecture the
    lean forward does not cover), the native step (fp16 LoRA stacks: ``lora.GatheredLoRA.use_fp16``) and
    label scoring. Rounding is idempotent; only weights that changed since the last call (an adapter
    loaded since) are rounded again. Norms (and DoRA's magnitudes) are not touched."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ws: list[torch.Tensor] = []
    loras: list[torch.Tensor] = []
    for name, m in base.named_modules():
        if type(m) in (torch.nn.Linear, torch.nn.Embedding) and m.weight is not None:
            (loras if "lora_" in name else ws).append(m.weight)
    done: frozenset = getattr(base, "_ft_rounded", frozenset())
    with torch.no_grad():
        for w in {id(w): w for w in ws}.values():  # a tied matrix once
            if (w.data_ptr(), w._version) in done:
                continue
            with torch.inference_mode(w.is_inference()):
                # a new tensor, not a copy into the old one: weights loaded from safetensors are often a private
                # mapping of the file, where writing in place copies every 4 KiB page on its first write
                # (measured on SmolLM2: 1.87 s in place, 0.19 s into fresh memory)
                w.data = w.half().float()
        for w in loras:  # in place: gathered LoRA's stacks share their storage (lora.py)
            if (w.data_ptr(), w._version) not in done and w.dtype == torch.float32:
                w.data.copy_(w.data.half())
    base._ft_rounded = frozenset(_signature_of(ws + loras))


def _pack(weights: list[torch.Tensor], biases: list[torch.Tensor | None]):
    w = torch.cat([x.detach().float() for x in weights], 0) if len(weights) > 1 else weights[0].detach().float()
    if all(b is None for b in biases):
        b = None
    else:
        b = torch.cat(
            [(x if x is not None else torch.zeros(wt.shape[0])).detach().float() for x, wt in zip(biases, weights)]
        )
    return torch.ops.quantized.linear_prepack_fp16(w.contiguous(), b)


def linear16(x: torch.Tensor, packed) -> torch.Tensor:
    """``x W16^T + b`` for a packed weight (``x``: (..., in), fp32)."""
    return torch.ops.quantized.linear_dynamic_fp16(x, packed)


def _signature_of(ws: list) -> tuple:
    return tuple((w.data_ptr(), w._version) for w in ws)


class Packed:
    """One base's packed weights: per layer (qkv, o, gate_up, down), the output layer, and the input
    embedding as fp16 too (it is the output layer's matrix when tied: one rounding for both). The fbgemm
    packs (``layers``, ``head``) are made on first use: where the native step runs (``native.py``, its own
    panels) they never are, which saved ~1.5 s of packing per process on SmolLM2."""

    def __init__(self, layers: list[list], head, embed):
        self._per_layer, self._head = layers, head
        self.lins = [lin for p in layers for lin in p] + [head, embed]
        self._weights = [m.weight for m in self.lins]  # the parameters read, kept: no Module lookup a step
        self.signature = _signature_of(self._weights)
        self.embed = embed.weight.detach().half()  # (V, d), looked up then widened to fp32

    @functools.cached_property
    def layers(self) -> list[tuple]:
        with torch.no_grad():
            return [
                (
                    _pack([q.weight, k.weight, v.weight], [q.bias, k.bias, v.bias]),
                    _pack([o.weight], [o.bias]),
                    _pack([g.weight, u.weight], [g.bias, u.bias]),
                    _pack([d.weight], [d.bias]),
                )
                for q, k, v, o, g, u, d in self._per_layer
            ]

    @functools.cached_property
    def head(self):
        with torch.no_grad():
            return _pack([self._head.weight], [self._head.bias])

    def fresh(self) -> bool:
        """True while every packed weight is the same parameter with the same storage and version (asked
        every step: 212 Module attribute lookups took 1.2 ms of a 36 ms SmolLM2 step)."""
        same = all(m._parameters.get("weight") is w for m, w in zip(self.lins, self._weights))
        return same and _signature_of(self._weights) == self.signature


def packed_for(base, layers: list[list], head, embed) -> Packed:
    """The packed weights of ``base`` (cached on it; repacked when a weight changed)."""
    cached = getattr(base, "_ft_packed", None)
    if cached is None or not cached.fresh():
        cached = Packed(layers, head, embed)
        base._ft_packed = cached
    return cached
