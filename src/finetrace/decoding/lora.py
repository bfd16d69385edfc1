"""Gathered LoRA for mixed-adapter batches: a cost per step that does not grow with the number of adapters.

PEFT's mixed-adapter batches (``adapter_names=[...]``) loop over the distinct adapters of a batch inside
every LoRA layer (select the rows, two small matmuls, scatter back), so a batch spread over 16 adapters
pays 16x the Python and kernel-launch overhead of a batch on one adapter. This module instead keeps, for
every LoRA ``Linear``, the adapters' weights stacked (slot 0 is all zeros, for base-model rows)::

    A_stack: (S, r_max, in)      A_stack[s] = A_s   (zero-padded to r_max: padding adds exactly 0)
    B_stack: (S, r_max, out)     B_stack[s] = B_s^T,  scale[s] = alpha_s / r_s

and computes every row's update with two batched matmuls over weights gathered by the row's slot
(the "BGMV" idea of Punica / S-LoRA)::

    y_b = W0 x_b + scale[s_b] (A_stack[s_b] x_b^T)^T B_stack[s_b]   # x: (B, T, in) -> (B, T, out)

(the A product is taken as ``A x^T``: on CPU a batched GEMV over contiguous rows of A is ~3x faster
than ``x A^T`` for decode shapes).

When all rows use the same adapter, it is one plain matmul pair (as a single-adapter server would do).
Used only for plain LoRA ``Linear`` layers; DoRA or other variants fall back to PEFT's mixed batches.
PEFT's own LoRA weights are re-pointed to views of the stacks, so an extra adapter costs about its own
size in memory (plus zero padding where ranks differ), not twice; with fp16 decode weights
(``use_fp16``) half as much again, for the fp16 copies the native step reads.
"""

from __future__ import annotations

import types

import torch


class GatheredLoRA:
    """Installs the gathered forward on every LoRA Linear of a PeftModel; ``rows`` selects slots per step."""

    def __init__(self, model):
        from peft.tuners.lora.layer import Linear

        self.modules = [m for m in model.modules() if isinstance(m, Linear)]
        self.slots: dict[str, int] = {}  # peft adapter name -> slot (1..); 0 is the base
        self.rows: torch.Tensor | None = None  # (B,) slot per row for the current forward
        self.single: int | None = None  # the one slot every row uses, if so
        self.key: tuple = ()  # the batch's composition: ("one", slot) or every row's slot (lean.py's plans)
        self.version = 0  # bumped by rebuild: plans made from older stacks are stale
        self.half = False  # stacks rounded to fp16 values, with fp16 copies for the native step (use_fp16)
        for m in self.modules:
            if not hasattr(m, "_ft_forward"):
                m._ft_forward = m.forward
                m._ft_gather = self
                m.forward = types.MethodType(_forward, m)
            m._ft_gather = self

    @staticmethod
    def supported(model) -> bool:
        """True when every LoRA layer is a plain (non-DoRA) Linear; else use PEFT's mixed batches."""
        from peft.tuners.lora.layer import Linear, LoraLayer

        for m in model.modules():
            if isinstance(m, LoraLayer):
                if not isinstance(m, Linear) or any(m.use_dora.values()) or getattr(m, "lora_variant", {}):
                    return False
        return True

    def rebuild(self, names: list[str]) -> None:
        """Restack the weights of adapters ``names`` (slot i+1 for names[i]); call after load/unload."""
        self.slots = {n: i + 1 for i, n in enumerate(names)}
        self.version += 1
        with torch.no_grad():
            for m in self.modules:
                present = [n for n in names if n in m.lora_A]
                r_max = max([m.lora_A[n].weight.shape[0] for n in present], default=1)
                w = m.base_layer.weight
                a = torch.zeros((len(names) + 1, r_max, m.in_features), dtype=w.dtype, device=w.device)
                b = torch.zeros((len(names) + 1, r_max, m.out_features), dtype=w.dtype, device=w.device)
                scale = torch.zeros(len(names) + 1, dtype=w.dtype, device=w.device)
                for n in present:
                    s, r = self.slots[n], m.lora_A[n].weight.shape[0]
                    wa, wb = m.lora_A[n].weight, m.lora_B[n].weight
                    a[s, :r, :] = wa
                    b[s, :r, :] = wb.T
                    scale[s] = m.scaling[n]
                    if wa.dtype == wb.dtype == w.dtype:  # PEFT's copies become views of the stacks: no 2nd copy
                        wa.data, wb.data = a[s, :r, :], b[s, :r, :].T
                m._ft_A, m._ft_B, m._ft_S = a, b, scale
        if self.half:
            self._halve()

    def use_fp16(self) -> None:
        """Round the stacks to fp16 values, now and after every rebuild, and keep fp16 copies
        (``_ft_A16``, ``_ft_B16``) for the native step: the decoder's fp16 weights (``packed.py``) for the
        adapters too, so that every path computes on the same numbers, and the rows of 16 adapters read
        half the bytes a step."""
        if not self.half:
            self.half = True
            self.version += 1  # plans and native layers made from the unrounded stacks are stale
            self._halve()

    def _halve(self) -> None:
        with torch.no_grad():
            for m in self.modules:
                if m._ft_A.dtype == torch.float32:
                    m._ft_A16, m._ft_B16 = m._ft_A.half(), m._ft_B.half()
                    m._ft_A.copy_(m._ft_A16)  # PEFT's LoRA weights, views of the stacks, are rounded with them
                    m._ft_B.copy_(m._ft_B16)

    def select(self, names: list[str]) -> dict:
        """Set the slot of each row (``"__base__"`` or unknown -> 0) for the next forward; no extra kwargs."""
        slots = [self.slots.get(n, 0) for n in names]
        self.single = slots[0] if len(set(slots)) == 1 else None
        self.rows = None if self.single is not None else torch.tensor(slots, dtype=torch.long)
        self.key = ("one", self.single) if self.single is not None else tuple(slots)
        return {}


class ActiveLoRA(GatheredLoRA):
    """Every row on the PeftModel's one active adapter, whatever its name: what PEFT's own forward computes,
    through the gathered kernel (a decoder given a PeftModel and no selector, e.g. ``generate``)."""

    def select(self, names: list[str]) -> dict:
        self.single, self.rows, self.key = 1, None, ("one", 1)
        return {}


def active_adapter(model) -> ActiveLoRA | None:
    """An ``ActiveLoRA`` for a PeftModel with one active plain-LoRA adapter and no selector installed yet;
    None otherwise (the model's own forward then applies whatever PEFT has active)."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    if not isinstance(model, PeftModel) or not GatheredLoRA.supported(model):
        return None
    active = list(getattr(model, "active_adapters", []) or [])
    if len(active) != 1 or any(hasattr(m, "_ft_gather") for m in model.modules()):
        return None
    g = ActiveLoRA(model)
    g.rebuild(active)
    return g


class PeftMixed:
    """PEFT's own mixed-adapter batches (``adapter_names=[...]``): DoRA and other variants."""

    def select(self, names: list[str]) -> dict:
        return {"adapter_names": list(names)}


def adapter_selector(model, kernel: str = "gathered", names: list[str] = ()):
    """How rows pick their adapter on ``model``: gathered LoRA when every layer allows it, else PEFT's
    mixed batches; None for a model without adapters."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return None
    if kernel == "gathered" and GatheredLoRA.supported(model):
        g = GatheredLoRA(model)
        g.rebuild(list(names))
        return g
    return PeftMixed()


def group_plan(mods: list, outs: list[int], key: tuple) -> tuple | None:
    """The LoRA terms of projections that share an input (q/k/v, gate/up; or one projection) for a batch
    composition ``key`` (``GatheredLoRA.key``), built once per composition instead of once per step.

    Every row on one slot ``s``: ``("one", A, B)``, one matmul pair for the whole group::

        A = [A_1; A_2; ...]                  (R, in)     stacked by rank (R = sum of the ranks)
        B = diag(s_1 B_1^T, s_2 B_2^T, ...)  (R, sum out) block-diagonal, each scale folded in
        x A^T B = [s_1 (x A_1^T) B_1^T, s_2 (x A_2^T) B_2^T, ...]

    Rows on different slots: ``("rows", [(c0, c1, A_g, B_g), ...])`` per projection, the row's own
    adapter gathered once (``A_g[b] = A_stack[s_b]`` (B, r, in), ``B_g[b] = scale[s_b] B_stack[s_b]``
    (B, r, out)), applied to output columns ``c0:c1`` by two batched matmuls. None when no row has LoRA
    on these projections."""
    live = [(m, sum(outs[:k]), o) for k, (m, o) in enumerate(zip(mods, outs)) if m is not None]
    if not live or (key[0] == "one" and not key[1]) or (key[0] != "one" and not any(key)):
        return None
    if key[0] == "one":
        s = key[1]
        a = torch.cat([m._ft_A[s] for m, _, _ in live], 0)  # (R, in)
        b = a.new_zeros((a.shape[0], sum(outs)))
        r0 = 0
        for m, c0, o in live:
            r = m._ft_A.shape[1]
            b[r0 : r0 + r, c0 : c0 + o] = m._ft_B[s] * m._ft_S[s]
            r0 += r
        return "one", a, b
    rows = torch.tensor(key, dtype=torch.long)
    per = []
    for m, c0, o in live:
        bg = m._ft_B.index_select(0, rows) * m._ft_S.index_select(0, rows).view(-1, 1, 1)
        per.append((c0, c0 + o, m._ft_A.index_select(0, rows), bg))
    return "rows", per


def lora_delta(m, x: torch.Tensor, g: GatheredLoRA) -> torch.Tensor | None:
    """The LoRA term of LoRA Linear ``m`` for input ``x`` with the slots ``g`` selected; None for base rows."""
    xa = x.to(m._ft_A.dtype)
    if g.single is not None:
        if g.single == 0:
            return None
        h = torch.nn.functional.linear(xa, m._ft_A[g.single]) * m._ft_S[g.single]
        return h @ m._ft_B[g.single]
    x3 = xa.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in)
    h = torch.bmm(m._ft_A.index_select(0, g.rows), x3.transpose(1, 2))  # (B, r, T)
    h = h * m._ft_S.index_select(0, g.rows).view(-1, 1, 1)
    delta = torch.bmm(h.transpose(1, 2), m._ft_B.index_select(0, g.rows))  # (B, T, out)
    return delta.reshape(*x.shape[:-1], delta.shape[-1])


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    g: GatheredLoRA = self._ft_gather
    if (g.rows is None and g.single is None) or kwargs.get("adapter_names") is not None or not hasattr(self, "_ft_A"):
        return self._ft_forward(x, *args, **kwargs)
    out = self.base_layer(x, *args, **kwargs)  # (B, T, out)
    delta = lora_delta(self, x, g)
    return out if delta is None else out + delta.to(out.dtype)
