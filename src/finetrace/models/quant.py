"""Quantised bases through bitsandbytes: 4-bit NF4/FP4 (QLoRA) and 8-bit (LLM.int8), loaded by transformers.

A quantisation is described by a small dict (the *spec*), recorded with the adapter, the run and the
documents, and turned into transformers' ``BitsAndBytesConfig`` only here:

    {"backend": "bitsandbytes", "version": "0.50.2", "bits": 4, "quant_type": "nf4",
     "double_quant": true, "compute_dtype": "float32"}

The compute dtype is chosen from the device when not given: float32 on a CPU (bf16 is many times slower
on CPUs without native support), bfloat16 on CUDA. ``bitsandbytes`` is the optional extra
``finetrace[quant]``; without it asking for a quantised base is a ``DependencyError`` saying how to
install it. The adapter trained on a quantised base is a plain PEFT adapter: it loads on the unquantised
base as well (``load_causal_lm(path, quantization=None)``).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DependencyError

EXTRA_HINT = "install the extra: pip install 'finetrace[quant]' (scripts/install.sh installs it)"


def require_bitsandbytes(what: str = "a quantised base") -> str:
    """The installed bitsandbytes version; DependencyError naming the extra when it is missing."""
    try:
        from importlib import metadata

        import bitsandbytes  # noqa: F401
    except ImportError:
        raise DependencyError(f"{what} needs bitsandbytes, which is not installed (extra finetrace[quant])",
                              hint=EXTRA_HINT) from None
    return metadata.version("bitsandbytes")


def make_spec(bits: int, quant_type: str = "nf4", double_quant: bool = True, compute_dtype: str = "auto",
              device_type: str = "cpu") -> dict:
    """The recorded description of a bitsandbytes quantisation (compute dtype resolved for the device)."""
    version = require_bitsandbytes(f"a {bits}-bit base")
    if compute_dtype == "auto":
        compute_dtype = "bfloat16" if device_type == "cuda" else "float32"
    spec = {"backend": "bitsandbytes", "version": version, "bits": int(bits), "compute_dtype": compute_dtype}
    if bits == 4:
        spec.update(quant_type=quant_type, double_quant=bool(double_quant))
    return spec


def bnb_config(spec: dict):
    """transformers' ``BitsAndBytesConfig`` for a spec."""
    import torch
    from transformers import BitsAndBytesConfig

    require_bitsandbytes()
    if spec["bits"] == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec["quant_type"],
                                  bnb_4bit_use_double_quant=spec["double_quant"],
                                  bnb_4bit_compute_dtype=getattr(torch, spec["compute_dtype"]))
    return BitsAndBytesConfig(load_in_8bit=True)


def weight_bytes(spec: dict | None, dtype: str = "float32") -> float:
    """Bytes per element of a quantised linear weight (NF4 with double quantisation: ~0.516)."""
    if spec is None:
        return {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}.get(dtype, 4.0)
    if spec["bits"] == 8:
        return 1.0 + 4.0 / 4096  # int8 + one fp32 scale per row (rows ~ thousands)
    # 4 bits + an absmax per 64 values: 8 bits (double quant, plus fp32 per 256 blocks) or 32 bits
    return 0.5 + (1.0 + 4.0 / 256) / 64 if spec.get("double_quant", True) else 0.5 + 4.0 / 64


def load_causal_lm(path: Path, dtype: str = "float32", quantization: dict | None = None, device=None,
                   attn_implementation: str | None = None):
    """A causal LM from a safetensors folder (no remote code), quantised by bitsandbytes when a spec is given.

    A quantised model is placed on ``device`` as it loads (shard by shard: the unquantised weights of a
    shard are never all in memory at once); an unquantised one loads on the CPU, to be moved by the caller.
    """
    import torch
    from transformers import AutoModelForCausalLM

    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if quantization is not None:
        dev = torch.device(device or "cpu")
        kw.update(quantization_config=bnb_config(quantization),
                  device_map={"": dev.index if dev.type == "cuda" else "cpu"})
        dtype = quantization["compute_dtype"]
    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), use_safetensors=True,
                                                trust_remote_code=False, **kw)


def adapters_quantization(adapters, device_type: str = "cpu") -> dict | None:
    """The quantised base the adapters were trained on (re-resolved for this device), or None.

    Evaluating an adapter defaults to the base it was trained on; adapters trained on different bases
    cannot share one evaluation (InputError).
    """
    from ..errors import InputError

    specs = {(q["bits"], q.get("quant_type"), q.get("double_quant")) if q else None
             for q in ((a.metadata or {}).get("quantization") for a in adapters)}
    if len(specs) > 1:
        raise InputError("these adapters were trained on differently quantised bases: "
                         f"{', '.join(a.ref for a in adapters)}", hint="evaluate them in separate runs")
    spec = next(iter(specs), None)
    if spec is None:
        return None
    bits, quant_type, double_quant = spec
    return make_spec(bits, quant_type or "nf4", True if double_quant is None else double_quant, "auto", device_type)
