"""Data parallelism under ``torchrun``: the same command, N processes, one recorded run; and the device
each process trains on.

    torchrun --nproc_per_node=2 -m finetrace.cli train CONFIG.yaml      (gloo on CPU, nccl on GPU)

Every process builds the same plan (it is a pure function of the seed), takes every N-th micro-batch of
each step, and the gradients are summed across processes before the optimiser step. Because each
micro-batch's loss is divided by the target tokens of the *whole* step, the summed gradient is exactly
the single-process gradient of the same global batch. Rank 0 alone writes checkpoints, the adapter and
the ledger run; the other ranks wait for it and return the same artifact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import DependencyError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup() -> World:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); else a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if gpu_per_process():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if gpu_per_process() else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def gpu_per_process() -> bool:
    """Does every process on this node get a GPU of its own? (else: CPU processes over gloo)"""
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def collective_device() -> str:
    """Where tensors handed to collectives must live: the GPU for nccl, the CPU for gloo."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def all_reduce_grads(params, world: World) -> None:
    """Sum gradients over processes (missing gradients count as zeros)."""
    if world.size == 1:
        return
    import torch
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def all_sum(value: float, world: World) -> float:
    if world.size == 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def any_flag(flag: bool, world: World) -> bool:
    """True on every rank if it is true on any (a signal received by one rank stops all)."""
    return all_sum(1.0 if flag else 0.0, world) > 0 if world.size > 1 else flag


def barrier(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()


def resolve_device(name: str):
    """The torch device of ``device: auto|cpu|cuda|cuda:N`` (torchrun has set this process's GPU)."""
    import torch

    if name == "auto":
        name = "cuda" if gpu_per_process() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DependencyError(
                f"device: {name} was asked for, but PyTorch sees no CUDA GPU here",
                hint="set device: cpu (or auto), or install a CUDA build of torch",
            )
        if name == "cuda":
            name = f"cuda:{torch.cuda.current_device()}"
    return torch.device(name)


def device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
