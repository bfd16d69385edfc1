"""Model setup for training: the base model (quantised or not), the method (LoRA, rsLoRA, DoRA, QLoRA, full)
and a parent adapter.

Target modules are found per architecture: every ``nn.Linear`` inside the decoder, the output layer
excluded, named by their last attribute (``q_proj``, ``gate_proj``...). The LoRA initialisation is seeded,
so the same config and seed give the same adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .attention import register
from .config import TrainConfig
from .fused import fuse_lora

if TYPE_CHECKING:  # torch loads lazily, inside the functions that need it
    import torch

ADAPTER_META = "finetrace_adapter.json"


def load_base(path: Path, dtype: str = "float32", quantization: dict | None = None, device=None):
    """The base model (safetensors only, no remote code) with packed attention, and its tokenizer.

    With a quantisation spec (``models.quant``) the base is quantised by bitsandbytes as it loads, onto
    ``device``; without one it loads on the CPU at ``dtype``.
    """
    from transformers import AutoTokenizer

    return load_weights(path, dtype, quantization, device), AutoTokenizer.from_pretrained(path)


def load_weights(path: Path, dtype: str = "float32", quantization: dict | None = None, device=None):
    """The base model alone (see ``load_base``), with packed attention."""
    from ..models.quant import load_causal_lm

    return load_causal_lm(path, dtype, quantization, device, attn_implementation=register())


def quantization_spec(cfg: TrainConfig, device) -> dict | None:
    """The recorded quantisation of the base (None: unquantised); DependencyError without bitsandbytes."""
    q = cfg.quantization
    if q.bits is None:
        return None
    from ..models.quant import make_spec

    return make_spec(q.bits, q.quant_type, q.double_quant, q.compute_dtype, device.type)


def linear_targets(model) -> list[str]:
    """Names of the decoder's linear layers (the LoRA targets for 'all-linear')."""
    import torch

    head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, mod in model.base_model.named_modules()
        if isinstance(mod, torch.nn.Linear) and mod is not head
    }
    return sorted(names)


# duplicates: alike market/registry.py:_check_manifest on purpose (a library error turned into a finetrace error with a hint).
def apply_method(model, cfg: TrainConfig, parent_path: Path | None):
    """Wrap ``model`` for training; returns (model, method facts recorded with the adapter)."""
    import torch

    torch.manual_seed(cfg.seed)
    if cfg.method == "full":
        if parent_path is not None:
            raise ConfigError(
                "init_from continues an adapter; it cannot be combined with method: full", field="init_from"
            )
        for p in model.parameters():
            p.requires_grad_(True)
        return model, {"method": "full"}
    from peft import LoraConfig, PeftModel, get_peft_model

    if parent_path is not None:
        model = PeftModel.from_pretrained(model, str(parent_path), is_trainable=True)
        fuse_lora(model)
        pc = model.peft_config["default"]
        method = "dora" if pc.use_dora else "rslora" if pc.use_rslora else "qlora" if cfg.method == "qlora" else "lora"
        return model, {
            "method": method,
            "r": pc.r,
            "alpha": pc.lora_alpha,
            "dropout": pc.lora_dropout,
            "target_modules": sorted(pc.target_modules),
        }
    targets = linear_targets(model) if cfg.lora.target_modules == "all-linear" else list(cfg.lora.target_modules)
    pc = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        use_rslora=cfg.method == "rslora",
        use_dora=cfg.method == "dora",
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, pc)
    except ValueError as exc:
        raise ConfigError(
            f"cannot apply LoRA: {exc}",
            field="lora.target_modules",
            hint=f"linear layers of this model: {', '.join(linear_targets(model))}",
        ) from None
    fuse_lora(model)
    return model, {
        "method": cfg.method,
        "r": cfg.lora.r,
        "alpha": cfg.lora.alpha,
        "dropout": cfg.lora.dropout,
        "target_modules": targets,
    }


def trainable(model) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters by name, in a fixed order (tied weights once)."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out


def read_adapter_meta(path: Path) -> dict:
    f = path / ADAPTER_META
    if not f.is_file():
        raise ConfigError(f"{path} is not a finetrace adapter ({ADAPTER_META} missing)", field="init_from")
    return json.loads(f.read_text())


def load_adapter_weights(model, adapter_dir: Path):
    """finetrace's own loading of an adapter folder onto a base model (no PeftModel.from_pretrained):
    the LoRA config from ``finetrace_adapter.json``, the weights from ``adapter_model.safetensors``."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    meta = read_adapter_meta(adapter_dir)
    pc = LoraConfig(
        r=meta["r"],
        lora_alpha=meta["alpha"],
        lora_dropout=meta["dropout"],
        target_modules=meta["target_modules"],
        use_rslora=meta["method"] == "rslora",
        use_dora=meta["method"] == "dora",
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, pc)
    state = load_file(adapter_dir / "adapter_model.safetensors")
    result = set_peft_model_state_dict(model, state)
    if result.unexpected_keys:
        raise ConfigError(
            f"adapter {adapter_dir} holds weights this model has no place for: {result.unexpected_keys[:3]}"
        )
    model.eval()
    return model
