"""The memory plan: peak memory of a training run estimated before any weight is loaded.

Read from the model folder's ``config.json`` and safetensors headers (never the weights) and from the
tokenised data (the largest micro-batch the run will make), per process:

    weights        decoder linear layers at their dtype or quantisation (NF4 ~0.52 byte, int8 ~1 byte),
                   embeddings, norms and an untied output layer at the compute dtype (on a quantised
                   base: at the stored dtype when narrower, e.g. bf16, see ``models.quant``)
    loading        unquantised: the largest shard while it is read (mapped pages count as resident);
                   quantised: one linear tensor at a time (read with pread, widened, quantised)
    adapter        LoRA A and B (fp32), their gradients and AdamW's two moments: 4 x 4 bytes each
                   (full fine-tuning: every weight, its gradient and two moments)
    activations    saved for backward, per token of the largest micro-batch: per layer ~(k_h H + k_i I)
                   values (H hidden, I intermediate); with gradient checkpointing only each recomputed
                   layer's input, plus the full set of every layer that is not (``checkpoint_layers``)
                   or of the one being recomputed; on a quantised base two dequantised copies of the
                   largest linear weight
    loss           one (loss_chunk x vocab) block of logits in fp32 (its gradient is formed in place); at
                   most 64 MiB when a bf16-stored output layer is widened or the compute dtype is bf16
                   (``models.quant.loss_rows``),
                   plus two widened blocks of its weight
    runtime        the Python, torch and transformers process itself (measured, ``RUNTIME_MB``)

Under FSDP weights, adapter and optimiser state are divided by the ranks. The estimate is checked
against the device's memory (CPU: ``MemAvailable`` plus this process's RSS; CUDA: free + reserved), and
a run that does not fit is refused with the cheapest change that does: a smaller micro-batch token budget,
gradient checkpointing (of the fewest layers that fit), an 8-bit or 4-bit base, or more FSDP ranks.
``finetrace train CONFIG --plan`` prints the plan; each run records it beside the measured peak
(``memory_plan`` in the run's metrics).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..models.folder import read_safetensors_header
from ..models.quant import VOCAB_BLOCK, auto_compute_dtype, loss_rows, weight_bytes

MB = 2**20
RUNTIME_MB = {"cpu": 520.0, "cuda": 0.0}  # import torch + transformers + peft, tokenizer, allocator slack
K_H, K_I = 8.0, 4.0  # values saved per token and layer: k_h per hidden unit, k_i per intermediate unit
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "U8": 1}


class MemoryPlanError(ConfigError):
    """The run's estimated peak memory exceeds what the device has; nothing was loaded (the hint names
    the cheapest config change that fits)."""


@dataclass
class ModelShape:
    """What the plan needs from a model folder (headers and config only)."""

    linear: list[tuple[str, int, int]]  # decoder linear layers: (name, out, in)
    other: int  # every other parameter (embeddings, norms, untied head)
    largest_shard: int  # bytes
    stored_bytes: int  # bytes per stored element (mode over tensors)
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    largest_linear: int = 0  # elements of the largest decoder linear weight


# duplicates: alike models/folder.py:describe on purpose (per-layer module shapes listed in the same order).
def read_shape(folder: Path) -> ModelShape:
    """Shapes of a model folder's tensors from its safetensors headers and config.json."""
    cfg = json.loads((folder / "config.json").read_text())
    text = cfg.get("text_config") or cfg
    linear, other, largest, counts = [], 0, 0, {}
    for f in sorted(folder.glob("*.safetensors")):
        largest = max(largest, f.stat().st_size)
        for name, t in read_safetensors_header(f).items():
            if name == "__metadata__":
                continue
            n = 1
            for d in t["shape"]:
                n *= d
            counts[t["dtype"]] = counts.get(t["dtype"], 0) + n
            if len(t["shape"]) == 2 and ".layers." in name and name.endswith(".weight"):
                linear.append((name[: -len(".weight")], t["shape"][0], t["shape"][1]))
            else:
                other += n
    stored = DTYPE_BYTES.get(max(counts, key=counts.get), 4) if counts else 4
    return ModelShape(
        linear,
        other,
        largest,
        stored,
        text["hidden_size"],
        text.get("intermediate_size") or 4 * text["hidden_size"],
        text["num_hidden_layers"],
        text["vocab_size"],
        max((o * i for _, o, i in linear), default=0),
    )


@dataclass
class Plan:
    """Estimated peak memory of one process, by part (MiB), and what the device has."""

    parts: dict[str, float]
    device: str
    available_mb: float | None
    settings: dict = field(default_factory=dict)
    suggestion: str | None = None

    @property
    def peak_mb(self) -> float:
        p = self.parts
        train = sum(v for k, v in p.items() if k != "loading")
        return max(train, p["weights"] + p["loading"] + p["runtime"])

    @property
    def fits(self) -> bool:
        return self.available_mb is None or self.peak_mb <= self.available_mb

    def to_json(self) -> dict:
        return {
            "peak_mb": round(self.peak_mb, 1),
            "parts_mb": {k: round(v, 1) for k, v in self.parts.items()},
            "device": self.device,
            "available_mb": None if self.available_mb is None else round(self.available_mb, 1),
            "fits": self.fits,
            **self.settings,
            **({"suggestion": self.suggestion} if self.suggestion else {}),
        }

    def render(self) -> str:
        lines = [
            f"memory plan ({self.device}, per process): " + ", ".join(f"{k}={v}" for k, v in self.settings.items())
        ]
        for k, v in self.parts.items():
            lines.append(f"  {k:<12} {v:10.1f} MiB")
        avail = "unknown" if self.available_mb is None else f"{self.available_mb:,.0f} MiB"
        lines.append(
            f"  {'peak':<12} {self.peak_mb:10.1f} MiB   available {avail}: " + ("fits" if self.fits else "does NOT fit")
        )
        if self.suggestion:
            lines.append(f"  cheapest change that fits: {self.suggestion}")
        return "\n".join(lines) + "\n"


def _targets(shape: ModelShape, target_modules) -> list[tuple[str, int, int]]:
    if target_modules == "all-linear":
        return shape.linear
    return [t for t in shape.linear if t[0].rsplit(".", 1)[-1] in set(target_modules)]


def estimate(shape: ModelShape, s: dict, device: str) -> dict[str, float]:
    """Parts of the peak (MiB) for settings ``s``: method, bits, dtype, r, targets, tokens, checkpointing,
    loss_chunk, world (FSDP ranks, 1 otherwise)."""
    compute = 4.0 if s["dtype"] == "float32" else 2.0
    spec = {"bits": s["bits"], "double_quant": True} if s["bits"] else None
    lin = sum(o * i for _, o, i in shape.linear)
    per_weight = weight_bytes(spec, s["dtype"]) if spec else compute
    other = min(compute, shape.stored_bytes) if spec else compute  # quantised: embeddings kept as stored
    shard = s["world"] if s["fsdp"] else 1
    weights = (lin * per_weight + shape.other * other) / shard
    if s["method"] == "full":
        trainable = lin + shape.other
    else:
        trainable = sum(s["r"] * (o + i) for _, o, i in _targets(shape, s["target_modules"]))
    adapter = trainable * 4.0 * (4 if s["method"] != "full" else 3) / shard
    tokens, h, inter = s["tokens"], shape.hidden, shape.intermediate
    per_layer = (K_H * h + K_I * inter) * compute * tokens
    # checkpointed layers keep their input; the others their full set; one checkpointed layer is recomputed
    # only after the kept ones were freed (they run backward first)
    ck = checkpointed_layers(shape, s)
    acts = ck * h * compute * tokens + max(shape.layers - ck, 1 if ck else 0) * per_layer
    if spec:  # a quantised layer's weight is dequantised where used (forward and backward: two at a time)
        acts += 2 * shape.largest_linear * compute
    widened = spec is not None and shape.stored_bytes < compute  # a bf16-stored head widened chunk by chunk
    capped = widened or compute < 4  # models.quant.logits_capped: bf16 hidden states cap the block too
    loss = (
        1.25 * min(loss_rows(s["loss_chunk"], shape.vocab, capped), tokens) * shape.vocab * 4.0
        + 2 * tokens * h * 4.0
        + (2 * VOCAB_BLOCK * h * 4.0 if widened else 0.0)
    )
    loading = shape.largest_linear * (shape.stored_bytes + 2 * compute) if spec else shape.largest_shard
    return {
        "runtime": RUNTIME_MB.get(device, 0.0),
        "weights": weights / MB,
        "adapter": adapter / MB,
        "activations": acts / MB,
        "loss": loss / MB,
        "loading": loading / MB,
    }


def checkpointed_layers(shape: ModelShape, s: dict) -> int:
    """How many decoder layers recompute their activations under settings ``s``."""
    if not s["checkpointing"]:
        return 0
    n = s.get("checkpoint_layers")
    return default_checkpoint_layers(shape.layers) if n is None else min(n, shape.layers)


def default_checkpoint_layers(layers: int) -> int:
    """``checkpoint_layers: null``: every decoder layer but the last. The last one's backward comes first,
    right after its forward: recomputing it would hold the same activations at the same time, for nothing."""
    return max(1, layers - 1)


def settings_of(cfg, tokens: int, world: int, device: str = "cpu") -> dict:
    q = cfg.quantization
    dtype = cfg.dtype if q.bits is None else q.compute_dtype
    if dtype == "auto":
        dtype = auto_compute_dtype(q.bits, device)
    return {
        "method": cfg.method,
        "bits": q.bits,
        "dtype": dtype,
        "r": cfg.lora.r,
        "target_modules": cfg.lora.target_modules,
        "tokens": tokens,
        "checkpointing": cfg.gradient_checkpointing,
        "checkpoint_layers": cfg.checkpoint_layers,
        "loss_chunk": cfg.loss_chunk,
        "world": world,
        "fsdp": cfg.parallel == "fsdp" and world > 1,
    }


def available_mb(device) -> float | None:
    """Memory this process may still use: CPU MemAvailable (and the cgroup limit) plus its own RSS; CUDA free."""
    if getattr(device, "type", device) == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return (free + torch.cuda.memory_reserved(device)) / MB
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        avail = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return (avail + rss_bytes()) / MB


def rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measured_peak(device) -> dict:
    """This process's peak memory so far: resident (VmHWM), and on CUDA the allocator's peak."""
    import resource

    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if getattr(device, "type", device) == "cuda":
        import torch

        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / MB, 1)
    return out


def make_plan(cfg, folder: Path, tokens: int, device, world: int) -> Plan:
    """The plan of ``cfg`` on the model in ``folder`` with micro-batches of at most ``tokens`` tokens."""
    shape = read_shape(folder)
    dev = getattr(device, "type", str(device))
    s = settings_of(cfg, tokens, world, dev)
    avail = available_mb(device)
    if env_limit_mb() is not None:
        avail = env_limit_mb() if avail is None else min(avail, env_limit_mb())
    plan = Plan(
        estimate(shape, s, dev),
        dev,
        avail,
        {
            **{k: s[k] for k in ("method", "bits", "dtype", "tokens", "checkpointing", "world")},
            **({"checkpoint_layers": checkpointed_layers(shape, s)} if s["checkpointing"] else {}),
        },
    )
    if not plan.fits:
        plan.suggestion = cheapest_fix(shape, s, dev, plan.available_mb)
    return plan


def cheapest_fix(shape: ModelShape, s: dict, device: str, avail: float) -> str:
    """The first change, cheapest first, whose estimate fits in ``avail`` MiB."""

    def peak(**kw) -> float:
        return Plan(estimate(shape, {**s, **kw}, device), device, None).peak_mb

    t = s["tokens"]
    while t > 256:
        t //= 2
        if peak(tokens=t) <= avail:
            return f"micro_batch_tokens: {t} (estimated peak {peak(tokens=t):,.0f} MiB; the same update, more passes)"
    most = default_checkpoint_layers(shape.layers)
    for n in range(checkpointed_layers(shape, s) + 1, most + 1):  # the fewest recomputed layers first
        ck = {"checkpointing": True, "checkpoint_layers": None if n == most else n}
        if peak(**ck) <= avail:
            what = "gradient_checkpointing: true" if n == most else f"checkpoint_layers: {n}"
            if n < most and not s["checkpointing"]:
                what = f"gradient_checkpointing: true with {what}"
            elif n == most and s.get("checkpoint_layers") is not None:
                what += " with checkpoint_layers: null"
            return f"{what} (estimated peak {peak(**ck):,.0f} MiB; {n} of {shape.layers} layers recomputed)"
    full = {"checkpointing": True, "checkpoint_layers": None}
    for bits, what in ((8, "quantization.bits: 8 (an 8-bit base)"), (4, "method: qlora (a 4-bit NF4 base)")):
        if s["method"] != "full" and (s["bits"] or 16) > bits:
            q = {"bits": bits, "dtype": auto_compute_dtype(bits, device)}  # what compute_dtype: auto would run
            for ck in ({}, full):
                if peak(**q, **ck) <= avail:
                    extra = " with gradient_checkpointing: true" if ck and not s["checkpointing"] else ""
                    return f"{what}{extra} (estimated peak {peak(**q, **ck):,.0f} MiB)"
    for n in (2, 4, 8, 16, 32, 64):
        if n > s["world"] and peak(world=n, fsdp=True, **full) <= avail:
            return (
                f"parallel: fsdp on {n} processes with gradient_checkpointing: true (torchrun "
                f"--nproc_per_node={n}; estimated {peak(world=n, fsdp=True, **full):,.0f} MiB each)"
            )
    return (
        "none of micro_batch_tokens, gradient checkpointing, quantisation or up to 64 FSDP ranks fits: use a "
        "smaller model or a machine with more memory"
    )


def check(plan: Plan) -> None:
    """Refuse a plan that does not fit (MemoryPlanError naming estimate, available and the cheapest fix)."""
    if plan.fits:
        return
    raise MemoryPlanError(
        f"this run needs an estimated {plan.peak_mb:,.0f} MiB per process ("
        + ", ".join(f"{k} {v:,.0f}" for k, v in plan.parts.items() if v >= 1)
        + f") but {plan.available_mb:,.0f} MiB are available on {plan.device}; nothing was loaded",
        hint=f"set {plan.suggestion}" if plan.suggestion else None,
    )


def env_limit_mb() -> float | None:
    """``FINETRACE_MEMORY_LIMIT_MB`` overrides what the device has (tests, shared machines)."""
    v = os.environ.get("FINETRACE_MEMORY_LIMIT_MB")
    return float(v) if v else None
