"""A lean forward for Llama-family models: the decoder's own loop over the model's weights, one call a step.

Why write our own (and only this): on this CPU a decode step of SmolLM2-135M through transformers'
``LlamaForCausalLM.forward`` spends most of its time outside the matmuls: per layer it dispatches
through modules, hooks, kwargs and the ``Cache`` API, and per forward it builds a causal mask with the
masking utilities, so that a batch-1 step costs several times what reading the weights once does (see
``bench/serve_throughput.py``). This module keeps everything that carries the maths from transformers
(the same weights, its rotary-embedding module, ``F.scaled_dot_product_attention``, RMSNorm as torch's
``rms_norm``, bit-identical to the formula written there) and drops only the dispatch:

    x = E[ids]                                                    # (B*q, d), rows flattened
    for each layer:  h = rms_norm(x, w_in)                        # torch's fused op: bit-identical here
                     [q|k|v] = h [Wq; Wk; Wv]^T   (+ LoRA)        # one GEMM for the three
                     [q|k] = [q|k] cos + roll([q|k]) sin'         # rope on q and k in one pass
                     K, V = cache.update(k, v)                    # preallocated slabs (kvcache.SlabLayer)
                     x = x + sdpa(q, K, V, mask) Wo^T   (+ LoRA)  # one additive mask for all layers
                     h = rms_norm(x, w_post)
                     x = x + (silu(h Wg^T) * (h Wu^T)) Wd^T   (+ LoRA, [Wg; Wu] one GEMM)
    logits = rms_norm(x[last], w_norm) W_head^T                   # last position only: (B, V)

LoRA: per batch composition (which slot each row is on) ``lora.group_plan`` builds, once, what each
group of projections needs: one matmul pair over the fused group when every row is on one adapter, the
rows' own adapters gathered into batched-matmul stacks when they differ (the gather no longer runs
every step); base rows add nothing. Per layer a decode step is then ~25 kernels instead of ~50.

Covered: ``LlamaForCausalLM`` (bare or inside a ``PeftModel``) whose projections are plain
``nn.Linear`` (no bitsandbytes base) with SiLU MLPs, and LoRA through ``lora.GatheredLoRA``. Anything
else (another architecture, a quantised base, DoRA, PEFT's mixed batches) returns ``None`` from
``lean_forward`` and the decoder calls the model's own forward: exact, slower. Evaluation, serving and
``generate`` all decode through ``batch.Decoder``, which makes that choice the same way for the same
model, so what is evaluated is what is served.

Weights: ``weights="fp32"`` runs on the model's own weights (exactly its forward, up to summation
order); ``weights="fp16"`` (``packed.py``, the decoder's default on a CPU with fbgemm) runs on fp16
copies with fp32 compute, q/k/v and gate/up fused into one GEMM each, and, when every row is on one
adapter, their LoRA terms fused into one matmul pair each. Measured (one thread, SmolLM2-135M, LoRA
r=8, 16 adapters loaded, a shared 2-core machine at load 3-5, CPU time per decode step): batch 16 on 16
adapters ~235 -> ~150 ms, batch 16 on one ~175 -> ~145 ms, batch 1 ~75 -> ~65-73 ms (there the fp16
GEMMs, bound by one core's memory bandwidth, are ~2/3 of the step).

Forwards without an explicit mask (decode steps, prefill chunks, label scoring's prompt pass) go to
``native.py`` when it can run here: the same formulas in one C call, without the per-kernel dispatch.

Not done: ``torch.compile`` of the step (a cold compile costs minutes on this 2-core machine, longer
than most evaluation runs); int8 weights (fbgemm's dynamic int8 quantises activations per tensor, so a
row's answer would depend on the rows batched with it; ``torch._int_mm`` and ``_weight_int8pack_mm``
measured 5-50x slower than fp32 here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .lora import GatheredLoRA, group_plan
from .native import native_step
from .packed import Packed, linear16, packed_for

_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_GROUPS = ((0, 1, 2), (3,), (4, 5), (6,))  # projections sharing one input: one GEMM (and one LoRA pair) each


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
        self._plan_cache: dict = {}  # (adapters.version, batch composition) -> per-layer LoRA plans
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        self.head = base.lm_head
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.layers: list = []  # (input norm, post-attention norm, [(base Linear, LoRA layer or None)] x 7)
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

    def packed(self) -> Packed | None:
        """The fp16 packed weights (``packed.py``) when decoding with ``weights="fp16"``, else None."""
        if self.weights != "fp16":
            return None
        return packed_for(self.base, [[lin for lin, _ in p] for _, _, p in self.layers], self.head, self.embed)

    def _plans(self) -> list | None:
        """Per layer, the LoRA plan (``lora.group_plan``) of each group (q/k/v, o, gate/up, down) for the
        batch composition the adapters have selected; made once per composition, not per step."""
        g = self.adapters
        if g is None:
            return None
        key = (g.version, g.key)
        hit = self._plan_cache.get(key)
        if hit is None:
            if len(self._plan_cache) >= 3:  # compositions change as rows come and go: keep the latest few
                self._plan_cache.pop(next(iter(self._plan_cache)))
            hit = [
                [group_plan([p[j][1] for j in grp], [p[j][0].out_features for j in grp], g.key) for grp in _GROUPS]
                for _, _, p in self.layers
            ]
            self._plan_cache[key] = hit
        return hit

    @staticmethod
    def _group(h, p, pk, grp: tuple, plan) -> torch.Tensor:
        """One group's base projections of ``h`` (B*q, in) concatenated (one fp16 GEMM when packed), plus
        their LoRA terms (``plan``: ``lora.group_plan``)."""
        if pk is not None:
            out = linear16(h, pk)
        elif len(grp) == 1:
            out = F.linear(h, p[grp[0]][0].weight, p[grp[0]][0].bias)
        else:
            out = torch.cat([F.linear(h, p[j][0].weight, p[j][0].bias) for j in grp], -1)
        if plan is None:
            return out
        if plan[0] == "one":
            return out.addmm_(F.linear(h, plan[1]), plan[2])
        B = plan[1][0][2].shape[0]
        h3 = h.view(B, -1, h.shape[-1])  # (B, q, in)
        o3 = out.view(B, -1, out.shape[-1])
        for c0, c1, a, b in plan[1]:
            t = torch.bmm(a, h3.transpose(1, 2))  # (B, r, q)
            o3[..., c0:c1] += torch.bmm(t.transpose(1, 2), b)  # (B, q, out_j)
        return out

    def forward(self, ids, mask, positions, layers, keep=None) -> torch.Tensor:
        """Logits of the last position, (B, V). ``ids``/``positions``: (B, q); ``mask``: (B, t + q) over the
        cache columns plus the new ones (1 = attend); ``layers``: one ``SlabLayer`` per model layer.
        ``keep``: an explicit (B, 1, q, t + q) boolean attention mask instead of ``mask`` + causal; then the
        logits of every position, (B, q, V) (label scoring's labels side by side)."""
        B, q = ids.shape
        H, KV, hd = self.heads, self.kv_heads, self.head_dim
        packed = self.packed()
        if packed is not None:  # a decode step, a prefill chunk or a label pass: one C call when it can run
            step = native_step(self, packed)
            logits = step(ids, mask, positions, layers, self.adapters, keep) if step is not None else None
            if logits is not None:
                return logits
        plans = self._plans()
        x = self.embed(ids) if packed is None else F.embedding(ids, packed.embed).float()  # (B, q, d)
        d = x.shape[-1]
        cos, sin = self.rotary(x, positions)  # (B, q, hd)
        # rotate_half(x) * sin == roll(x, hd/2) * [-sin_1, sin_2]: one roll instead of slices, neg and cat
        half = hd // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), -1)[:, :, None]  # (B, q, 1, hd)
        cos = cos[:, :, None]
        t = mask.shape[1]
        every = keep is not None
        if keep is None:
            keep = mask.bool()[:, None, None, :]  # (B, 1, 1, t)
        if q > 1 and not every:
            cols = torch.arange(t, device=ids.device)
            rows = torch.arange(t - q, t, device=ids.device)
            keep = keep & (cols[None, :] <= rows[:, None])[None, None]  # (B, 1, q, t)
        # the additive mask sdpa would build from the bool one, built once for all layers
        bias = torch.zeros(keep.shape, dtype=x.dtype).masked_fill_(~keep, float("-inf"))
        g = KV and H // KV
        x = x.reshape(B * q, d)
        for i, ((n_in, n_post, p), cache) in enumerate(zip(self.layers, layers)):
            pk = packed.layers[i] if packed is not None else (None, None, None, None)
            pl = plans[i] if plans is not None else (None, None, None, None)
            h = F.rms_norm(x, (d,), n_in.weight, n_in.variance_epsilon)  # LlamaRMSNorm (bit-identical on fp32)
            qkv = self._group(h, p, pk[0], _GROUPS[0], pl[0])  # (B*q, (H + 2 KV) hd)
            qk = qkv[:, : (H + KV) * hd].view(B, q, H + KV, hd)
            qk = qk * cos + qk.roll(half, -1) * sin  # rope on q and k at once: (B, q, H + KV, hd)
            K, V = cache.update(
                qk[:, :, H:].transpose(1, 2), qkv[:, (H + KV) * hd :].view(B, q, KV, hd).transpose(1, 2)
            )  # (B, KV, t, hd) views of the slabs
            if q == 1 and not every:  # decode: the query heads of one KV head packed as its "positions"
                o = F.scaled_dot_product_attention(
                    qk[:, 0, :H].view(B, KV, g, hd), K, V, attn_mask=bias, scale=self.scale
                )
                o = o.reshape(B, H * hd)
            else:
                qs = qk[:, :, :H].transpose(1, 2)  # (B, H, q, hd)
                K, V = K.repeat_interleave(g, 1), V.repeat_interleave(g, 1)
                o = F.scaled_dot_product_attention(qs, K, V, attn_mask=bias, scale=self.scale)
                o = o.transpose(1, 2).reshape(B * q, H * hd)
            x = x + self._group(o, p, pk[1], _GROUPS[1], pl[1])
            h = F.rms_norm(x, (d,), n_post.weight, n_post.variance_epsilon)
            gu = self._group(h, p, pk[2], _GROUPS[2], pl[2])
            inter = gu.shape[-1] // 2
            x = x + self._group(F.silu(gu[:, :inter]) * gu[:, inter:], p, pk[3], _GROUPS[3], pl[3])
        x = x.view(B, q, d) if every else x.view(B, q, d)[:, -1]  # (B, q, d) or (B, d)
        last = F.rms_norm(x, (d,), self.norm.weight, self.norm.variance_epsilon)
        return linear16(last, packed.head) if packed is not None else F.linear(last, self.head.weight, self.head.bias)


def lean_forward(model, adapters, weights: str = "fp32") -> LeanLlama | None:
    """A ``LeanLlama`` for ``model`` with ``adapters`` when it covers them exactly, else None; ``weights``:
    ``"fp32"`` (the model's own weights) or ``"fp16"`` (``packed.py``: fp16 storage, fp32 compute)."""
    try:
        return LeanLlama(model, adapters, weights) if covers(model, adapters) else None
    except (AttributeError, TypeError):
        return None
