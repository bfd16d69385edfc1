"""The ``train`` stage: LoRA-family (and full) fine-tuning from a typed config, fast and resumable.

    from finetrace.train import TrainConfig, load_config, train
    adapter = train(ws, load_config("configs/lora-sft.yaml", ["lr=1e-4"]), resume=False)

Files: ``config`` (the typed config, YAML + overrides), ``data`` (tokenising, data order, packing),
``attention`` (per-example attention for packed rows), ``loss`` (output layer at target positions only,
chunked cross-entropy), ``preference`` (the DPO objective: chunked sequence log-probabilities, reference
pass, pair losses), ``adapters`` (base model + method), ``fused`` (the LoRA update folded into the base
GEMMs), ``kernels`` (compiled RMSNorm, SiLU gate and rotary), ``checkpoint`` (atomic, verified,
resumable), ``report`` (metrics, loss curve, FLOPs), ``distributed`` (torchrun data parallelism),
``objective`` (SFT and DPO behind one interface), ``quant`` lives in ``models.quant`` (bitsandbytes bases),
``plan`` (peak memory estimated before loading, refusal with the cheapest fix), ``fsdp`` (FSDP2 sharding),
``loop`` (the loop, the device, ``train`` and ``memory_plan``).
"""

from .config import TrainConfig, describe, load_config
from .loop import memory_plan, train

__all__ = ["TrainConfig", "describe", "load_config", "memory_plan", "train"]
