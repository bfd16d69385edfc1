"""Seeded random-initialised models of real architectures' shapes, written as sharded safetensors.

Only SmolLM2-135M has real weights offline; benchmarks and tests at billion-parameter scale use a model
with a real architecture's config (``SHAPES``) and seeded random weights instead (speed and memory do not
depend on the weights' values). The model is built on the meta device (no memory), and each tensor is
materialised, written into its shard and dropped, one at a time: building it never needs more than one
shard's worth of memory, never two copies of the model. The folder looks like a Hub download:

    config.json  generation_config.json  tokenizer files
    model-00001-of-00003.safetensors ...  model.safetensors.index.json   (weight_map, total_size)

    python -m finetrace.models.random_init OUT_DIR [--shape llama-3.2-1b] [--dtype bfloat16]

Not a user-facing command: the benchmarks (``bench/train_scale.py``) and tests call ``write_random_model``.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

# Llama-3.2-1B's published config (hidden 2048, 16 layers, 32/8 heads, vocab 128256, tied embeddings)
# duplicates: alike within on purpose (a table of model shapes: alike by nature, one entry per shape).
SHAPES = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    # small shapes of the same family, for tests and quick benchmark runs
    "llama-100m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
    "llama-60m": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
    "llama-8m": dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=8192,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    ),
}


def plan_shards(shapes: dict[str, tuple[int, ...]], bytes_per: int, shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most ``shard_bytes`` (a larger tensor gets a shard alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = bytes_per
        for d in shape:
            n *= d
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _init(name: str, shape, dtype, std: float, seed: int):
    """One tensor, seeded by (seed, name) so its values do not depend on the order of writing."""
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen).to(dtype)


def write_random_model(
    out_dir: str | Path,
    shape: str | dict = "llama-3.2-1b",
    seed: int = 0,
    dtype: str = "bfloat16",
    shard_bytes: int = 1 << 30,
    tokenizer=None,
) -> Path:
    """Write a seeded random model of ``shape`` (a name in SHAPES or LlamaConfig keyword arguments) to
    ``out_dir`` as sharded safetensors with an index; returns the folder.

    ``tokenizer``: the tokenizer to save (default: the tiny BPE tokenizer of ``models.tiny``, whose ids
    all fall inside any real vocabulary).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from .tiny import build_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer or build_tokenizer()
    kw = dict(SHAPES[shape] if isinstance(shape, str) else shape)
    cfg = LlamaConfig(
        **kw, bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dtype=dtype
    )
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    shapes = {
        n: tuple(p.shape)
        for n, p in model.state_dict().items()
        if not (cfg.tie_word_embeddings and n == "lm_head.weight")
    }
    tdtype = getattr(torch, dtype)
    shards = plan_shards(shapes, torch.empty((), dtype=tdtype).element_size(), shard_bytes)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: _init(n, shapes[n], tdtype, cfg.initializer_range, seed) for n in names}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, out / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg.save_pretrained(out)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def parameter_count(shape: str | dict = "llama-3.2-1b") -> int:
    """Parameters of a shape (tied embeddings once), counted on the meta device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(SHAPES[shape] if isinstance(shape, str) else shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**kw))
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(write_random_model(a.out, a.shape, a.seed, a.dtype))
    sys.exit(0)
