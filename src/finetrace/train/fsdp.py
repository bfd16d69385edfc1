"""Sharded data parallelism (``parallel: fsdp``): PyTorch FSDP2 ``fully_shard`` under torchrun.

    torchrun --nproc_per_node=2 -m finetrace.cli train CONFIG.yaml      # with parallel: fsdp

Each decoder layer is one FSDP group, and the backbone (embeddings, final norm) the root group: every
process keeps 1/N of the frozen base, of the adapter and of AdamW's moments, and all-gathers a layer's
weights only while that layer runs (forward, and backward, where gradient checkpointing recomputes it).
Gradients are reduce-scattered *summed* (divide factor 1), because each micro-batch's loss is already
divided by the counts of the whole optimiser step: N processes give the update of one (see
``distributed``). FSDP's collectives run inside every forward, so all processes must make the same number
of passes: a process with fewer micro-batches in a step repeats one with weight 0 (its contribution is
exactly zero).

The tied output layer is read through the input embedding (which the root group holds unsharded between
forward and backward); an untied output layer stays whole on every process. Checkpoints gather full
tensors on every process and rank 0 writes them in the single-process format, so a run resumes on any
number of processes; the adapter is written from the gathered tensors, a plain PEFT folder as always.
"""

from __future__ import annotations

import types

from ..errors import ConfigError


def check_supported(cfg) -> None:
    """Refuse the combinations FSDP does not drive yet (ConfigError naming ``parallel``)."""
    if cfg.quantization.bits is not None:
        raise ConfigError(
            "parallel: fsdp does not shard bitsandbytes-quantised bases yet",
            field="parallel",
            hint="use parallel: ddp with method: qlora (a 4-bit base is small), or fsdp on the unquantised base",
        )
    if cfg.objective == "dpo":
        raise ConfigError(
            "parallel: fsdp does not run the DPO reference pass yet",
            field="parallel",
            hint="use parallel: ddp for objective: dpo",
        )


def shard(model) -> int:
    """Apply ``fully_shard`` to every decoder layer and to the backbone; returns the number of groups."""
    import torch
    from torch.distributed.fsdp import fully_shard

    from .loss import parts

    backbone, _ = parts(model)
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise ConfigError(
            f"parallel: fsdp needs a decoder with .layers; {type(backbone).__name__} has none",
            field="parallel",
            hint="use parallel: ddp for this model",
        )
    mods = list(layers) + [backbone]
    for mod in mods:
        fully_shard(mod)
        mod.set_gradient_divide_factor(1.0)  # a sum, like DDP's all_reduce_grads here
        mod.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    if getattr(lm.config, "tie_word_embeddings", False) and head is not None:
        # FSDP swaps the embedding's parameter object as it (un)shards; the tied head must follow it
        lm.set_output_embeddings(TiedHead(emb))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(mods)


def _tied_head_class():
    import torch

    class TiedHead(torch.nn.Module):
        """Stands in for a tied output layer: its weight is, at every moment, the input embedding's."""

        def __init__(self, embedding):
            super().__init__()
            object.__setattr__(self, "_embedding", embedding)  # not a submodule: FSDP owns it once
            self.bias = None

        @property
        def weight(self):
            return self._embedding.weight

    return TiedHead


def TiedHead(embedding):  # noqa: N802 - a class made lazily (torch imports late)
    return _tied_head_class()(embedding)


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t):
    """The whole tensor of a (possibly sharded) parameter or state; a collective on every process."""
    return t.full_tensor() if is_sharded(t) else t


def replicated(params) -> list:
    """Trainable parameters FSDP does not shard (gradients still need ``all_reduce_grads``)."""
    return [p for p in params if not is_sharded(p)]


def gathered(weights: dict, optimizer) -> tuple[dict, object]:
    """Full copies of the weights and of AdamW's state, shaped like (weights, optimizer) for ``Checkpointer``."""
    state, out = {}, {}
    for name, p in weights.items():
        fp = full(p.detach())
        out[name] = fp
        st = optimizer.state.get(p)
        if st:
            state[fp] = {k: full(v) if hasattr(v, "detach") else v for k, v in st.items()}
    return out, types.SimpleNamespace(state=state)


def shard_loaded(loaded: dict, weights: dict) -> dict:
    """A checkpoint read from disk, its tensors re-sharded like the live parameters (for ``restore``)."""
    from torch.distributed.tensor import distribute_tensor

    def like(p, t):
        return distribute_tensor(t.to(p.device), p.device_mesh, p.placements) if is_sharded(p) else t

    w = {n: like(weights[n], t) if n in weights else t for n, t in loaded["weights"].items()}
    opt = {}
    for key, t in loaded["optimizer"].items():
        name, kind = key.split("::", 1)
        opt[key] = t if kind == "step" or name not in weights else like(weights[name], t)
    best = loaded.get("best")
    if best is not None:
        best = {n: like(weights[n], t) if n in weights else t for n, t in best.items()}
    return {**loaded, "weights": w, "optimizer": opt, "best": best}
