"""A lean forward for Llama-family models: the decoder's own loop over the model's weights, one call a step.

Why write our own (and only this): on this CPU a decode step of SmolLM2-135M through transformers'
``LlamaForCausalLM.forward`` spends most of its time outside the matmuls: per layer it dispatches
through modules, hooks, kwargs and the ``Cache`` API, and per forward it builds a causal mask with the
masking utilities, so that a batch-1 step costs several times what reading the weights once does (see
``bench/serve_throughput.py``). This module keeps everything that carries the maths from transformers
(the same weights, its rotary-embedding module, ``F.scaled_dot_product_attention``, the RMSNorm formula
as written there) and drops only the dispatch:

    x = E[ids]                                                    # (B, q, d)
    for each layer:  h = rms(x) * w_in
                     q, k, v = h Wq^T, h Wk^T, h Wv^T   (+ LoRA)  # (B, heads, q, hd) after rope
                     K, V = cache.update(k, v)                    # preallocated slabs (kvcache.SlabLayer)
                     x = x + sdpa(q, K, V, mask) Wo^T   (+ LoRA)
                     h = rms(x) * w_post
                     x = x + (silu(h Wg^T) * (h Wu^T)) Wd^T   (+ LoRA)
    logits = rms(x[:, -1]) * w_norm  W_head^T                     # last position only: (B, V)

LoRA is the gathered kernel of ``lora.py`` (the same function, so the numbers are the same ones the
modules compute): the delta is applied only where a row's adapter is not the base, one matmul pair
when all rows share one adapter, gathered batched matmuls where they differ.

Covered: ``LlamaForCausalLM`` (bare or inside a ``PeftModel``) whose projections are plain
``nn.Linear`` (no bitsandbytes base) with SiLU MLPs, and LoRA through ``lora.GatheredLoRA``. Anything
else (another architecture, a quantised base, DoRA, PEFT's mixed batches) returns ``None`` from
``lean_forward`` and the decoder calls the model's own forward: exact, slower. Evaluation, serving and
``generate`` all decode through ``batch.Decoder``, which makes that choice the same way for the same
model, so what is evaluated is what is served.

Weights: ``weights="fp32"`` runs on the model's own weights (exactly its forward, up to summation
order); ``weights="fp16"`` (``packed.py``, the decoder's default on a CPU with fbgemm) runs on fp16
copies with fp32 compute, q/k/v and gate/up fused into one GEMM each, and, when every row is on one
adapter, their LoRA terms fused into one matmul pair each. Measured (CPU time per decode step, one
thread, SmolLM2-135M, LoRA r=8, load ~4-5): batch 1 ~100 -> ~55 ms, batch 16 ~240 -> ~120 ms.

Not done: ``torch.compile`` of the step (a cold compile costs minutes on this 2-core machine, longer
than most evaluation runs); int8 weights (fbgemm's dynamic int8 quantises activations per tensor, so a
row's answer would depend on the rows batched with it; ``torch._int_mm`` and ``_weight_int8pack_mm``
measured 5-50x slower than fp32 here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .lora import GatheredLoRA, lora_delta
from .packed import Packed, fused_lora, linear16, packed_for

_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _base_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _plain_linear(m) -> torch.nn.Linear | None:
    """The plain ``nn.Linear`` doing ``m``'s base matmul (``m`` itself or a PEFT layer's base), else None."""
    base = getattr(m, "base_layer", m)
    return base if type(base) is torch.nn.Linear else None


def covers(model, adapters) -> bool:
    """True when ``LeanLlama`` computes exactly what ``model`` (with ``adapters``) does."""
    from peft import PeftModel

    base = _base_of(model)
    if type(base).__name__ != "LlamaForCausalLM" or getattr(base.config, "pretraining_tp", 1) > 1:
        return False
    if getattr(base.config, "hidden_act", "silu") != "silu" or base.training:
        return False
    if isinstance(model, PeftModel) != isinstance(adapters, GatheredLoRA):
        return False  # a PeftModel decodes through the gathered kernel, or through its own forward
    gathered = set(map(id, adapters.modules)) if adapters is not None else set()
    if type(base.model.embed_tokens) is not torch.nn.Embedding or type(base.model.norm).__name__ != "LlamaRMSNorm":
        return False
    for layer in base.model.layers:
        if {type(layer.input_layernorm).__name__, type(layer.post_attention_layernorm).__name__} != {"LlamaRMSNorm"}:
            return False
        for m in [getattr(layer.self_attn, p, None) for p in _PROJ[:4]] + [
            getattr(layer.mlp, p, None) for p in _PROJ[4:]
        ]:
            if m is None or _plain_linear(m) is None:
                return False
            if hasattr(m, "base_layer") and id(m) not in gathered:
                return False  # a LoRA layer the gathered kernel does not drive
    return type(base.lm_head) is torch.nn.Linear


class LeanLlama:
    """The lean forward over a Llama model's own parameters (no copies); see the module docstring."""

    def __init__(self, model, adapters: GatheredLoRA | None, weights: str = "fp32"):
        base = _base_of(model)
        self.base, self.weights = base, weights
        cfg = base.config
        inner = base.model
        self.adapters = adapters
        self._fused_cache: dict = {}  # packed.fused_lora's per-slot pairs
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        self.head = base.lm_head
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.layers = []
        for layer in inner.layers:
            a, mlp = layer.self_attn, layer.mlp
            mods = [a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
            self.layers.append(
                (
                    layer.input_layernorm,
                    layer.post_attention_layernorm,
                    [(_plain_linear(m), m if hasattr(m, "_ft_A") else None) for m in mods],
                )
            )

    def _lin(self, x, proj, packed=None) -> torch.Tensor:
        lin, lora = proj
        out = F.linear(x, lin.weight, lin.bias) if packed is None else linear16(x, packed)
        return self._lora(out, x, lora)

    def _lora(self, out, x, lora) -> torch.Tensor:
        if lora is not None and self.adapters is not None:
            d = lora_delta(lora, x, self.adapters)
            if d is not None:
                out = out + d.to(out.dtype)
        return out

    def packed(self) -> Packed | None:
        """The fp16 packed weights (``packed.py``) when decoding with ``weights="fp16"``, else None."""
        if self.weights != "fp16":
            return None
        return packed_for(self.base, [[lin for lin, _ in p] for _, _, p in self.layers], self.head, self.embed)

    def _fused(self, out, h, p, group: tuple, key) -> tuple:
        """``out``, one GEMM over projections ``group`` fused, plus their LoRA terms, split per projection:
        one fused LoRA pair (``packed.fused_lora``) when every row is on one adapter, else one per projection."""
        sizes, mods, g = [p[j][0].out_features for j in group], [p[j][1] for j in group], self.adapters
        if g is not None and g.single and any(m is not None for m in mods):
            a, b = fused_lora(self._fused_cache, key, mods, sizes, g.single)
            return (out + F.linear(h, a) @ b).split(sizes, -1)
        return tuple(self._lora(o, h, m) for o, m in zip(out.split(sizes, -1), mods))

    def _qkv(self, h, p, pk, i):
        if pk is None:
            return self._lin(h, p[0]), self._lin(h, p[1]), self._lin(h, p[2])
        return self._fused(linear16(h, pk[0]), h, p, (0, 1, 2), (i, 0))  # one GEMM over [Wq; Wk; Wv]

    def _mlp(self, h, p, pk, i):
        if pk is None:
            return self._lin(F.silu(self._lin(h, p[4])) * self._lin(h, p[5]), p[6])
        g, u = self._fused(linear16(h, pk[2]), h, p, (4, 5), (i, 1))  # one GEMM over [Wg; Wu]
        return self._lin(F.silu(g) * u, p[6], pk[3])

    @staticmethod
    def _rms(norm, x) -> torch.Tensor:  # LlamaRMSNorm.forward, as written there
        dt = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * x.to(dt)

    def forward(self, ids, mask, positions, layers, keep=None) -> torch.Tensor:
        """Logits of the last position, (B, V). ``ids``/``positions``: (B, q); ``mask``: (B, t + q) over the
        cache columns plus the new ones (1 = attend); ``layers``: one ``SlabLayer`` per model layer.
        ``keep``: an explicit (B, 1, q, t + q) boolean attention mask instead of ``mask`` + causal; then the
        logits of every position, (B, q, V) (label scoring's labels side by side)."""
        B, q = ids.shape
        packed = self.packed()
        x = self.embed(ids) if packed is None else F.embedding(ids, packed.embed).float()  # (B, q, d)
        cos, sin = self.rotary(x, positions)  # (B, q, hd)
        cos, sin = cos[:, None], sin[:, None]
        t = mask.shape[1]
        every = keep is not None
        if keep is None:
            keep = mask.bool()[:, None, None, :]  # (B, 1, 1, t)
        if q > 1 and not every:
            cols = torch.arange(t, device=ids.device)
            rows = torch.arange(t - q, t, device=ids.device)
            keep = keep & (cols[None, :] <= rows[:, None])[None, None]  # (B, 1, q, t)
        g = self.kv_heads and self.heads // self.kv_heads
        for i, ((n_in, n_post, p), cache) in enumerate(zip(self.layers, layers)):
            pk = packed.layers[i] if packed is not None else None
            h = self._rms(n_in, x)
            qs, ks, vs = self._qkv(h, p, pk, i)
            qs = qs.reshape(B, q, self.heads, self.head_dim).transpose(1, 2)
            ks = ks.reshape(B, q, self.kv_heads, self.head_dim).transpose(1, 2)
            vs = vs.reshape(B, q, self.kv_heads, self.head_dim).transpose(1, 2)
            qs = qs * cos + _rotate_half(qs) * sin
            ks = ks * cos + _rotate_half(ks) * sin
            K, V = cache.update(ks, vs)  # (B, kv, t, hd) views
            if q == 1 and not every:  # decode: the query heads of one KV head packed as its "positions"
                o = F.scaled_dot_product_attention(
                    qs.reshape(B, self.kv_heads, g, self.head_dim), K, V, attn_mask=keep, scale=self.scale
                )  # (B, kv, g, hd)
                o = o.reshape(B, 1, -1)
            else:
                K, V = K.repeat_interleave(g, 1), V.repeat_interleave(g, 1)
                o = F.scaled_dot_product_attention(qs, K, V, attn_mask=keep, scale=self.scale)
                o = o.transpose(1, 2).reshape(B, q, -1)
            x = x + self._lin(o, p[3], None if pk is None else pk[1])
            h = self._rms(n_post, x)
            x = x + self._mlp(h, p, pk, i)
        last = self._rms(self.norm, x if every else x[:, -1:])
        out = linear16(last, packed.head) if packed is not None else F.linear(last, self.head.weight, self.head.bias)
        return out if every else out[:, -1]


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def lean_forward(model, adapters, weights: str = "fp32") -> LeanLlama | None:
    """A ``LeanLlama`` for ``model`` with ``adapters`` when it covers them exactly, else None; ``weights``:
    ``"fp32"`` (the model's own weights) or ``"fp16"`` (``packed.py``: fp16 storage, fp32 compute)."""
    try:
        return LeanLlama(model, adapters, weights) if covers(model, adapters) else None
    except (AttributeError, TypeError):
        return None
