"""The training configuration: one typed model, filled from YAML and ``--set key=value`` overrides.

Every field has a description (``finetrace train --print-config`` shows them). An unknown or mistyped
key is a ``ConfigError`` naming the key, the file and line where it was written, and the closest valid key:

    >>> load_config("train.yaml", ["lr=1e-4", "lora.r=8"])     # dotted keys reach nested fields
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from .. import yamlfile
from ..errors import ConfigError
from ..tracking import TrackingParams

METHODS = ("lora", "rslora", "dora", "full", "qlora")
# Upper bounds: far beyond any sensible value, low enough that a typo (1e23) is refused, not run.
BIG = 100_000_000
SEED_MAX = 2**64 - 1
SPLIT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"  # torch.manual_seed's range
ModuleName = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.*\-]+$")]
# inf and nan are refused in every float (``lr: 1e400`` is inf); true/false is not a number
STRICT_NUMBERS = ConfigDict(extra="forbid", allow_inf_nan=False)


def _no_bool(v):
    if isinstance(v, bool):
        raise ValueError("a number is expected, not true/false")
    return v


# duplicates: alike DpoParams on purpose (pydantic field declarations).
class LoraParams(BaseModel):
    """Parameters of the LoRA family (``x -> W0 x + (alpha/r) B A x``; rsLoRA scales by alpha/sqrt(r))."""

    model_config = STRICT_NUMBERS

    r: int = Field(16, ge=1, le=65536, description="Rank of the low-rank update B A.")
    alpha: float = Field(
        32.0,
        gt=0,
        le=1e6,
        description="Scale numerator: the update is multiplied by alpha/r (alpha/sqrt(r) for rslora).",
    )
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on the LoRA input (0 is fastest and exactly reproducible)."
    )
    target_modules: Annotated[list[ModuleName], Field(min_length=1, max_length=1000)] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt, or 'all-linear' for every linear layer of the "
        "decoder (the output layer excluded), chosen per architecture.",
    )

    _number = field_validator("r", "alpha", "dropout", mode="before")(lambda v: _no_bool(v))


# duplicates: alike LoraParams on purpose (pydantic field declarations).
class DpoParams(BaseModel):
    """Parameters of the DPO objective (Rafailov et al. 2023; names as in TRL).

    For a pair (prompt x, chosen y_w, rejected y_l), with log-probabilities log pi (the adapter being
    trained) and log pi_ref (the policy at the start of training):

        z = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))
        sigmoid:  -(1 - s) log sigmoid(beta z) - s log sigmoid(-beta z)      (s = label_smoothing)
        ipo:      (z - 1 / (2 beta))^2            (log-probabilities averaged per token, as TRL does)
        hinge:    max(0, 1 - beta z)
    """

    model_config = STRICT_NUMBERS

    beta: float = Field(
        0.1,
        gt=0,
        le=1e4,
        description="Strength of the pull towards the reference model (the KL "
        "penalty): larger keeps the adapter closer to where it started.",
    )
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid",
        description="sigmoid (the DPO paper), ipo (squared loss on per-token averages, less prone "
        "to overfitting) or hinge (SLiC/RSO).",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Assumed probability that a preference label is flipped (conservative DPO; sigmoid only).",
    )
    sft_weight: float = Field(
        0.0,
        ge=0,
        le=1e4,
        description="Weight of an extra NLL term on the chosen answers "
        "(per chosen target token, RPO-style); 0 is plain DPO.",
    )

    _number = field_validator("beta", "label_smoothing", "sft_weight", mode="before")(lambda v: _no_bool(v))

    @model_validator(mode="after")
    def _smoothing_needs_sigmoid(self) -> DpoParams:
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(
                f"label_smoothing applies to loss_type sigmoid only, not {self.loss_type}; "
                f"set dpo.label_smoothing: 0 or dpo.loss_type: sigmoid"
            )
        return self


class QuantParams(BaseModel):
    """A quantised frozen base through bitsandbytes (extra ``finetrace[quant]``); LoRA trains in full precision."""

    model_config = ConfigDict(extra="forbid")

    bits: Literal[4, 8] | None = Field(
        None,
        description="Quantise the frozen base to 4 bits (QLoRA, what "
        "method: qlora sets) or 8 bits (LLM.int8); null keeps it at 'dtype'.",
    )
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type: nf4 (NormalFloat, the QLoRA paper's) or fp4."
    )
    double_quant: bool = Field(True, description="Quantise the 4-bit blocks' scales too (~0.4 bit per weight saved).")
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Dtype the quantised layers compute in (and the unquantised weights are kept in): "
        "auto is bfloat16 on CUDA, and on a CPU bfloat16 for 4 bits where it multiplies bf16 in hardware "
        "(AMX, AVX512-BF16), else float32; recorded with the run.",
    )


PARALLEL = ("ddp", "fsdp")


# duplicates: alike data/options.py:ImportOptions on purpose (pydantic field declarations).
class TrainConfig(BaseModel):
    """Everything a training run depends on; stored resolved with the run in the ledger."""

    model_config = STRICT_NUMBERS

    # what to train
    base_model: str = Field(
        ..., min_length=1, max_length=1000, description="Base model artifact: name, name@N or digest."
    )
    dataset: str = Field(..., min_length=1, max_length=1000, description="Dataset artifact: name, name@N or digest.")
    split: str = Field("train", pattern=SPLIT_NAME, description="Split of the dataset to train on.")
    validation_split: str | None = Field(
        "validation",
        pattern=SPLIT_NAME,
        description="Split used for validation loss (skipped when the dataset has no such split; null to disable).",
    )
    objective: Literal["sft", "dpo"] = Field(
        "sft",
        description="Training objective: 'sft' puts the loss on the target (assistant) tokens and the "
        "end-of-turn token only (completion, chat, classification datasets); 'dpo' learns "
        "from preference pairs (prompt, chosen, rejected) with the 'dpo' parameters.",
    )
    method: Literal["lora", "rslora", "dora", "full", "qlora"] = Field(
        "lora",
        description="lora, rslora, dora (all through peft), full (every weight, a reference), or "
        "qlora (LoRA on a 4-bit NF4 base with double quantisation, through bitsandbytes: "
        "extra finetrace[quant]).",
    )
    quantization: QuantParams = Field(
        default_factory=QuantParams,
        validate_default=True,
        description="Quantised base (bitsandbytes): bits 4 or 8 for lora, rslora, dora; qlora sets bits 4.",
    )
    lora: LoraParams = Field(default_factory=LoraParams, description="LoRA-family parameters.")
    dpo: DpoParams = Field(default_factory=DpoParams, description="DPO parameters (used when objective is dpo).")
    init_from: str | None = Field(
        None, description="Continue training an existing adapter (adapter@N); its LoRA configuration is kept."
    )
    output_name: str = Field(..., description="Name of the adapter artifact written (versions are numbered).")

    # optimisation
    lr: float = Field(2e-4, gt=0, le=1.0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, le=100, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, le=1.0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, le=1e6, description="Clip the global gradient norm to this, > 0 (null: off)."
    )
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="Learning-rate decay after warmup.")
    warmup_steps: int = Field(0, ge=0, le=BIG, description="Linear warmup steps.")
    epochs: float = Field(1.0, gt=0, le=100_000, description="Passes over the training split (fractions allowed).")
    max_steps: int | None = Field(
        None, ge=1, le=BIG, description="Stop after this many optimiser steps (overrides epochs)."
    )

    # batching and speed
    batch_size: int = Field(
        8, ge=1, le=1_000_000, description="Examples per micro-batch (for dpo: preference pairs, two sequences each)."
    )
    grad_accum: int = Field(
        1,
        ge=1,
        le=1_000_000,
        description="Micro-batches per optimiser step; the loss is "
        "normalised by the real number of target tokens (dpo: of pairs) of the whole step.",
    )
    max_length: int = Field(
        1024,
        ge=8,
        le=BIG,
        description="Longest example in tokens (prompt + target); longer examples are skipped and counted.",
    )
    loss_turns: Literal["auto", "all", "last"] = Field(
        "auto",
        description="Chat data: 'last' puts the loss on the final assistant turn only; 'all' on every "
        "assistant turn without weight 0, the whole conversation rendered by the model's chat template; "
        "'auto': all for rows with tool calls or weights (OpenAI/ShareGPT imports), else last.",
    )
    packing: bool = Field(
        True,
        description="Concatenate a micro-batch's examples into one row without "
        "padding (attention never crosses examples).",
    )
    group_by_length: bool = Field(
        False,
        description="Order examples so a step holds examples of similar "
        "length (shuffled in windows of 64 steps); saves padding only when packing "
        "is off, and makes step sizes uneven.",
    )
    micro_batch_tokens: int | None = Field(
        1024,
        ge=16,
        le=BIG,
        description="Token budget per forward pass: a "
        "micro-batch larger than this is split (same update, bounded "
        "memory; null: no limit).",
    )
    loss_chunk: int = Field(
        1024,
        ge=16,
        le=BIG,
        description="Target positions per output-layer chunk, so the full logits tensor never exists.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (less memory, ~30% slower)."
    )
    checkpoint_layers: int | None = Field(
        None,
        ge=0,
        le=BIG,
        description="With gradient_checkpointing: how many decoder layers recompute their activations "
        "(the first N); each layer that keeps them is faster and holds one layer's activations more (null: "
        "all but the last, whose recompute would save nothing). A run that does not fit names the fewest "
        "that do.",
    )
    compile: bool = Field(
        True,
        description="Fuse RMSNorm, the SiLU gate and rotary embeddings into compiled "
        "kernels (torch.compile; needs a C++ compiler on CPU, else eager with a warning; the "
        "first run compiles for some seconds, later runs reuse the on-disk cache).",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Compute dtype (bfloat16 is much slower on CPUs without native support)."
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="Where to train: auto (the "
        "GPU when CUDA sees one, else the CPU), cpu, cuda or cuda:N; under torchrun each process "
        "takes the GPU of its LOCAL_RANK.",
    )
    threads: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Torch threads (default: OMP_NUM_THREADS if set, else the physical cores available).",
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under torchrun: ddp (every process holds the whole model; gradients summed) or fsdp "
        "(PyTorch FSDP2 fully_shard: base, adapter and optimiser state sharded across "
        "processes). One process: ignored.",
    )
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of data order, initialisation and dropout (0 to 2^64-1).")

    # evaluation, checkpoints, logging
    eval_every: int | None = Field(None, ge=1, le=BIG, description="Validation loss every N steps (and at the end).")
    eval_max_examples: int | None = Field(256, ge=1, le=BIG, description="Validation examples used (null: all).")
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        le=BIG,
        description="Stop after this many evaluations without improvement; the best weights are kept.",
    )
    checkpoint_every: int | None = Field(
        50, ge=1, le=BIG, description="Save a resumable checkpoint every N steps (and on SIGTERM/SIGINT)."
    )
    keep_checkpoints: int = Field(2, ge=1, le=10_000, description="Complete checkpoints kept on disk.")
    checkpoint_dir: str | None = Field(
        None,
        min_length=1,
        description="Where checkpoints go (default: the "
        "workspace's checkpoints/train/<output_name>); finetrace writes "
        "only inside its own marked subfolder there.",
    )
    log_every: int = Field(1, ge=1, le=BIG, description="Write a metrics line every N steps.")
    assumed_watts: float = Field(35.0, gt=0, le=1e7, description="Power assumed for the energy estimate (W).")
    tracking: TrackingParams | None = Field(
        None,
        exclude=True,
        description="Also report the run to MLflow "
        "and/or TensorBoard when it ends ({mlflow: URI, tensorboard: DIR}; "
        "needs finetrace[tracking]). Not part of the run's recorded config.",
    )

    @field_validator(
        "lr",
        "weight_decay",
        "eps",
        "max_grad_norm",
        "warmup_steps",
        "epochs",
        "max_steps",
        "batch_size",
        "grad_accum",
        "max_length",
        "micro_batch_tokens",
        "loss_chunk",
        "checkpoint_layers",
        "threads",
        "seed",
        "eval_every",
        "eval_max_examples",
        "early_stopping_patience",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "assumed_watts",
        mode="before",
    )
    @classmethod
    def _number(cls, v):
        return _no_bool(v)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each AdamW beta is in [0, 1), e.g. [0.9, 0.999]")
        return v

    @field_validator("quantization")
    @classmethod
    def _quantization_fits_method(cls, q: QuantParams, info) -> QuantParams:
        method = info.data.get("method")
        if method == "qlora":
            if q.bits == 8:
                raise ValueError(
                    "method: qlora is a 4-bit base; for an 8-bit base write method: lora with quantization.bits: 8"
                )
            q.bits = 4
        elif q.bits is not None and method == "full":
            raise ValueError("a quantised base cannot be fine-tuned in full; use method: lora (or qlora)")
        return q

    @field_validator("checkpoint_layers")
    @classmethod
    def _checkpoint_layers(cls, v: int | None, info) -> int | None:
        if v is not None and not info.data.get("gradient_checkpointing"):
            raise ValueError("checkpoint_layers applies with gradient_checkpointing: true; set that too")
        return v

    @field_validator("output_name")
    @classmethod
    def _name(cls, v: str) -> str:
        return yamlfile.artifact_name(v)


# -- loading -------------------------------------------------------------------------------------
REFERENCE = "run `finetrace train --print-config` for every key and its type"


def field_names(model: type[BaseModel] = TrainConfig, prefix: str = "") -> list[str]:
    """Every valid dotted key."""
    return yamlfile.field_names(model, prefix)


# Names users bring from other trainers (HF TrainingArguments, Axolotl, PEFT) -> ours.
ALIASES = {
    "learning_rate": "lr",
    "rank": "lora.r",
    "r": "lora.r",
    "lora_r": "lora.r",
    "lora_rank": "lora.r",
    "lora_alpha": "lora.alpha",
    "alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "dropout": "lora.dropout",
    "target_modules": "lora.target_modules",
    "lora_target_modules": "lora.target_modules",
    "gradient_accumulation_steps": "grad_accum",
    "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "lr_scheduler_type": "schedule",
    "lr_scheduler": "schedule",
    "scheduler": "schedule",
    "warmup": "warmup_steps",
    "max_seq_length": "max_length",
    "sequence_len": "max_length",
    "max_seq_len": "max_length",
    "model": "base_model",
    "base_model_name_or_path": "base_model",
    "output_dir": "output_name",
    "save_steps": "checkpoint_every",
    "eval_steps": "eval_every",
    "logging_steps": "log_every",
    "sample_packing": "packing",
    "use_rslora": "method",
    "use_dora": "method",
}


def suggest(key: str) -> str:
    """A hint naming the closest valid key."""
    close = yamlfile.suggest_key(TrainConfig, key, ALIASES)
    return f"did you mean '{close}'?" if close else "run `finetrace train --print-config` for valid keys"


def parse_override(item: str) -> tuple[str, Any]:
    """``key.sub=value`` -> (key.sub, YAML-parsed value)."""
    from ..errors import InputError
    from ..yamlfile import parse_text

    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"bad override {item!r}", hint="write --set key=value, e.g. --set lr=1e-4")
    try:
        value = parse_text(raw)[0] if raw.strip() else None
    except InputError:
        value = raw
    return key.strip(), value


def _set_dotted(doc: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = doc
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def build_config(doc: dict, *, file: str | None = None, lines: dict[str, int] | None = None) -> TrainConfig:
    """Validate a mapping; errors name the key (with file and line when known) and suggest a fix."""
    return yamlfile.validate_model(
        TrainConfig, doc, "training config", file=file, lines=lines, reference=REFERENCE, aliases=ALIASES
    )


def loc_key(loc: tuple, model: type[BaseModel] | None = TrainConfig) -> str:
    """The dotted key a pydantic error location points at (list indices and union branches dropped)."""
    return yamlfile.loc_key(loc, model)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML config (or start empty) and apply ``key=value`` overrides (dotted keys)."""
    doc: dict = {}
    lines: dict[str, int] = {}
    file = None
    if path is not None:
        file = str(path)
        doc, lines = yamlfile.read_config(path, "train config")
    for item in overrides:
        key, value = parse_override(item)
        if key not in field_names():
            raise ConfigError("unknown key in --set", field=key, hint=suggest(key))
        _set_dotted(doc, key, value)
        lines.pop(key, None)
    return build_config(doc, file=file, lines=lines)


def describe() -> str:
    """A commented YAML template of every key with its default (for ``--print-config``)."""
    out = []

    def emit(model: type[BaseModel], indent: str):
        for name, info in model.model_fields.items():
            ann = info.annotation
            out.append(f"{indent}# {info.description}")
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                out.append(f"{indent}{name}:")
                emit(ann, indent + "  ")
                continue
            default = (
                "<required>"
                if info.is_required()
                else json.dumps(list(info.default) if isinstance(info.default, tuple) else info.default)
            )
            out.append(f"{indent}{name}: {default}")

    emit(TrainConfig, "")
    return "\n".join(out) + "\n"


def config_yaml(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)
