"""Compiled element-wise kernels for training: RMSNorm, the gated MLP activation and rotary embeddings.

Between its GEMMs a decoder layer runs a dozen element-wise passes over (tokens x hidden) tensors
(normalisation, SiLU gate, rotary rotation, and about twice as many in the backward pass). In eager
PyTorch each is its own loop over memory, and on a 2-core CPU those passes were a sixth of a LoRA step
once the GEMMs were lean. ``torch.compile`` (Inductor) fuses each of these three functions into one
C++/OpenMP loop forward and one or two backward; GEMMs, attention and the LoRA layers stay as they are.

Only the training model is touched, and only where the module is known to compute what the compiled
function computes: the patched module is checked against its own eager forward on a random input before
it is used (a model whose RMSNorm differs, Gemma's ``1 + weight`` say, keeps its own). Rotary embeddings
are a module-level function in transformers: the replacement dispatches to the compiled version only
when gradients are being recorded, so generation and serving in the same process run the original.

The first compilation takes some seconds per function (Inductor then caches it on disk, under
``TORCHINDUCTOR_CACHE_DIR``); a machine without a C++ compiler, or any failure to compile, falls back to
eager with one warning. Shapes are dynamic, so packed rows of any length reuse one kernel.
"""

from __future__ import annotations

import sys
import types
import warnings

import torch
import torch.nn.functional as F

_COMPILED: dict[str, object] = {}
_BROKEN: list[str] = []  # the reason compilation is off in this process, once it failed


def rms_norm(x, weight, eps: float):
    """Llama's RMSNorm: computed in fp32, scaled by ``weight``, returned in the input's dtype."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def silu_gate(gate, up):
    return F.silu(gate) * up


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(q, k, cos, sin, unsqueeze_dim: int = 1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def compiled(name: str, fn, *key):
    """``fn`` compiled (dynamic shapes) for one ``key``, or None when compiling is unavailable here.

    Each key gets its own copy of the function's code object, so that Dynamo's per-code cache (and its
    recompile limit) is per key: a model of another width, a no-grad pass or a trainable norm weight
    compiles its own kernel instead of pushing the training kernel out of the cache.
    """
    if _BROKEN:
        return None
    k = (name, *key)
    if k not in _COMPILED:
        copy = types.FunctionType(
            fn.__code__.replace(), fn.__globals__, f"{fn.__name__}_{len(_COMPILED)}", fn.__defaults__, fn.__closure__
        )
        _COMPILED[k] = torch.compile(copy, dynamic=True)
    return _COMPILED[k]


def run(name: str, fn, key: tuple, *args):
    """``fn(*args)`` through its compiled kernel for ``key``; eager when compiling is off or fails here."""
    kernel = compiled(name, fn, *key)
    if kernel is None:
        return fn(*args)
    try:
        return kernel(*args)
    except Exception as exc:  # noqa: BLE001 - a compiler missing or failing: warn once, stay eager
        _disable(exc)
        return fn(*args)


def _disable(exc: BaseException) -> None:
    if not _BROKEN:
        _BROKEN.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        warnings.warn(
            f"finetrace: compiled kernels unavailable, training runs eager ({_BROKEN[0]})", RuntimeWarning, stacklevel=3
        )


def _probe_rng() -> torch.Generator:
    """Probes draw from their own generator: the global RNG (dropout, data order) must not move."""
    return torch.Generator().manual_seed(0)


def _noise(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=_probe_rng(), dtype=like.dtype).to(like.device)


def _check(module, fused_forward, make_input) -> bool:
    """Does ``fused_forward`` compute what ``module.forward`` computes (forward and input gradient)?"""
    x = make_input()
    try:
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = module.forward(xa), fused_forward(xb)
        g = torch.randn(ya.shape, generator=_probe_rng(), dtype=ya.dtype).to(ya.device)
        ya.backward(g)
        yb.backward(g)
    except Exception as exc:  # noqa: BLE001 - any compile/runtime failure means: stay eager
        _disable(exc)
        return False
    finally:
        for p in module.parameters():
            p.grad = None
    return _close(ya, yb) and _close(xa.grad, xb.grad)


def _close(a, b) -> bool:
    """Equal up to float rounding, relative to the tensor's scale (a real layer fed noise gives large values);
    the bound follows the dtype (bf16 keeps 8 bits of mantissa), and is far below what a different
    formula (Gemma's ``1 + w``, another activation) would give."""
    rel = max(1e-4, 4 * torch.finfo(a.dtype).eps)
    return bool((a.float() - b.float()).abs().max() <= rel * a.float().abs().max() + 1e-6)


def _is_rms_norm(module) -> bool:
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and isinstance(getattr(module, "variance_epsilon", None), float)
        and module.weight.dim() == 1
    )


def _is_gated_mlp(module) -> bool:
    return all(
        isinstance(getattr(module, a, None), torch.nn.Module) for a in ("gate_proj", "up_proj", "down_proj")
    ) and (
        isinstance(getattr(module, "act_fn", None), torch.nn.SiLU)
        or type(getattr(module, "act_fn", None)).__name__ == "SiLUActivation"
    )


def fuse_elementwise(model) -> dict[str, int]:
    """Route the model's RMSNorms, gated MLPs and rotary embeddings through compiled kernels.

    Returns how many of each were switched (all zeros when compiling is unavailable here).
    """
    counts = {"rms_norm": 0, "mlp": 0, "rotary": 0}
    if _BROKEN:
        return counts
    first = next(model.parameters())
    norms = [m for m in model.modules() if _is_rms_norm(m) and "forward" not in m.__dict__]
    if norms:

        def norm_forward(self, x):
            key = (torch.is_grad_enabled(), x.dtype, x.shape[-1], self.weight.requires_grad)
            return run("rms_norm", rms_norm, key, x, self.weight, self.variance_epsilon)

        probe = norms[0]
        shape = (1, 7, probe.weight.shape[0])
        if _check(probe, types.MethodType(norm_forward, probe), lambda: _noise(shape, first)) and not _BROKEN:
            for m in norms:
                m.forward = types.MethodType(norm_forward, m)
            counts["rms_norm"] = len(norms)
    mlps = [m for m in model.modules() if _is_gated_mlp(m) and "forward" not in m.__dict__]
    if mlps and not _BROKEN:

        def mlp_forward(self, x):
            g, u = self.gate_proj(x), self.up_proj(x)
            return self.down_proj(run("silu_gate", silu_gate, (torch.is_grad_enabled(), g.dtype, g.shape[-1]), g, u))

        probe = mlps[0]
        hidden = (
            probe.gate_proj.in_features
            if hasattr(probe.gate_proj, "in_features")
            else probe.gate_proj.base_layer.in_features
        )
        if _check(probe, types.MethodType(mlp_forward, probe), lambda: _noise((1, 7, hidden), first)) and not _BROKEN:
            for m in mlps:
                m.forward = types.MethodType(mlp_forward, m)
            counts["mlp"] = len(mlps)
    if not _BROKEN:
        counts["rotary"] = _patch_rotary(model)
    return counts


def _patch_rotary(model) -> int:
    """Swap the attention modules' ``apply_rotary_pos_emb`` for a dispatcher (compiled under autograd)."""
    patched = 0
    for mod in {type(m).__module__ for m in model.modules() if type(m).__name__.endswith("Attention")}:
        namespace = sys.modules.get(mod)
        original = getattr(namespace, "apply_rotary_pos_emb", None)
        if original is None or getattr(original, "_finetrace_original", None) is not None:
            patched += original is not None
            continue
        like = next(model.parameters())  # probe on the model's device: no CPU kernel built for a GPU run
        q, k, cos, sin = (_noise(shape, like) for shape in ((1, 2, 5, 8), (1, 1, 5, 8), (1, 5, 8), (1, 5, 8)))
        try:
            # the formula is checked here; its compiled kernel is built at the first training step
            want, got = original(q, k, cos, sin), rotary(q, k, cos, sin)
        except Exception:  # noqa: BLE001 - a rotary function of another signature: leave it
            continue
        if not all(_close(a, b) for a, b in zip(want, got)):
            continue

        def dispatch(q, k, cos, sin, *args, _original=original, **kwargs):
            if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad) and not args and not kwargs:
                return run("rotary", rotary, (q.dtype, q.shape[-1]), q, k, cos, sin)
            return _original(q, k, cos, sin, *args, **kwargs)

        dispatch._finetrace_original = original
        namespace.apply_rotary_pos_emb = dispatch
        patched += 1
    return patched
