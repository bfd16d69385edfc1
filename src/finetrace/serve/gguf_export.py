"""GGUF export of a merged Llama-family model, for llama.cpp and Ollama (F32, or Q8_0 to save space).

    finetrace export-model legal@1 --merged -o legal-merged/ --gguf      # also writes legal-merged/model.gguf

Written with the ``gguf`` package the way llama.cpp's converter writes a Llama: llama.cpp tensor names,
the rotary permutation of Q and K (llama.cpp pairs rotary dimensions (2i, 2i+1) within a head where
transformers pairs (i, i + d/2)), and a gpt2-style BPE tokenizer (tokens, token types, merges, special
ids, chat template) in the metadata. Only ``LlamaForCausalLM`` folders are supported (SmolLM2 and the
tiny test model are). transformers reads the file back (``from_pretrained(dir, gguf_file=...)``), which is
how the tests check it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import DependencyError, InputError

# HF llama parameter name (per layer) -> llama.cpp tensor name
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """(n_head * d, in): per head, reorder rows from halves (i, i + d/2) to interleaved pairs (2i, 2i+1)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(folder: Path, cfg: dict) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    hf: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        hf.update(load_file(f))
    out = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    if "lm_head.weight" in hf and not cfg.get("tie_word_embeddings", False):
        out["output.weight"] = hf["lm_head.weight"]
    for i in range(cfg["num_hidden_layers"]):
        for hf_name, gg_name in LAYER_NAMES.items():
            w = hf[f"model.layers.{i}.{hf_name}"]
            if gg_name == "attn_q.weight":
                w = rope_permute(w, cfg["num_attention_heads"])
            elif gg_name == "attn_k.weight":
                w = rope_permute(w, cfg["num_key_value_heads"])
            out[f"blk.{i}.{gg_name}"] = w
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def write_gguf(folder: str | Path, path: str | Path, name: str = "finetrace export", qtype: str = "f32") -> Path:
    """Write the HF Llama folder ``folder`` (safetensors + tokenizer.json) as GGUF at ``path``."""
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - gguf is a core dependency
        raise DependencyError("GGUF export needs the `gguf` package", hint="pip install gguf") from exc
    folder, path = Path(folder), Path(path)
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise InputError(
            f"GGUF export supports Llama-family models, not {cfg.get('model_type')!r}",
            file=str(folder / "config.json"),
            field="model_type",
        )
    if qtype not in ("f32", "q8_0"):
        raise InputError(f"unknown GGUF type {qtype!r}", hint="f32 or q8_0", field="--gguf-type")
    tj = json.loads((folder / "tokenizer.json").read_text())
    if tj.get("model", {}).get("type") != "BPE":
        raise InputError("GGUF export supports BPE tokenizers only", file=str(folder / "tokenizer.json"))
    tcfg = (
        json.loads((folder / "tokenizer_config.json").read_text())
        if (folder / "tokenizer_config.json").is_file()
        else {}
    )
    vocab = dict(tj["model"]["vocab"])
    for added in tj.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise InputError("the tokenizer's ids are not contiguous", file=str(folder / "tokenizer.json"))
    special = {a["content"] for a in tj.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    template = tcfg.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()

    rope = cfg.get("rope_parameters") or {}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "f32" else gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    for key, adder in (
        ("bos_token", w.add_bos_token_id),
        ("eos_token", w.add_eos_token_id),
        ("pad_token", w.add_pad_token_id),
    ):
        tok = tcfg.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok in vocab:
            adder(vocab[tok])
    w.add_add_bos_token(False)
    if template:
        w.add_chat_template(template)
    for tname, tensor in _tensors(folder, cfg).items():
        if qtype == "q8_0" and tensor.ndim == 2 and tensor.shape[-1] % 32 == 0:
            w.add_tensor(
                tname,
                gguf.quants.quantize(tensor, gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            w.add_tensor(tname, tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- LoRA adapters ------------------------------------------------------------------------------------
# PEFT module path (per layer) -> llama.cpp tensor name; what llama.cpp's convert_lora_to_gguf.py maps too.
LORA_TARGETS = {k.rsplit(".", 1)[0]: v.rsplit(".", 1)[0] for k, v in LAYER_NAMES.items() if "proj" in k}


def lora_tensors(adapter_dir: str | Path, base_cfg: dict) -> tuple[dict[str, np.ndarray], float]:
    """The GGUF LoRA tensors of a PEFT adapter folder and its ``lora_alpha``, laid out like llama.cpp's
    ``convert_lora_to_gguf.py`` writes them:

    - ``blk.{i}.{attn_q|...}.weight.lora_a`` = PEFT ``lora_A`` (r, in) and ``.lora_b`` = ``lora_B``
      (out, r), unchanged (GGUF stores numpy's row-major (r, in) as ne = [in, r], which llama.cpp expects);
    - for Q and K, ``lora_b`` gets the base's rotary row permutation (``rope_permute``), ``lora_a`` none,
      since ``B A`` must be permuted like the base weight it is added to (the converter's
      ``LoraTorchTensor.permute`` does the same);
    - the scale is not folded in: llama.cpp multiplies ``B A x`` by ``alpha / r`` (``r`` read from
      ``lora_b``), which equals PEFT's ``lora_alpha / r``. rsLoRA, per-module ranks or alphas, DoRA and
      adapters that train embeddings or the output layer have no such form and are refused.
    """
    from safetensors.numpy import load_file

    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    where = str(adapter_dir / "adapter_config.json")
    for key, why in (
        ("use_rslora", "rsLoRA scales by alpha/sqrt(r)"),
        ("use_dora", "DoRA has magnitude vectors"),
        ("rank_pattern", "per-module ranks"),
        ("alpha_pattern", "per-module alphas"),
        ("modules_to_save", "fully trained modules"),
    ):
        if cfg.get(key):
            raise InputError(
                f"this adapter cannot be written as a llama.cpp LoRA: {why} ({key})",
                file=where,
                field=key,
                hint="serve it with --engine native, or train it without this option",
            )
    if cfg.get("fan_in_fan_out"):
        raise InputError("fan_in_fan_out adapters are not supported", file=where, field="fan_in_fan_out")
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, w in weights.items():
        parts = key.split(".")
        try:
            i = int(parts[parts.index("layers") + 1])
            module = ".".join(parts[parts.index("layers") + 2 : -2])
            which = parts[-2]
        except (ValueError, IndexError):
            raise InputError(
                f"adapter tensor {key!r} is not a LoRA weight of a decoder layer",
                file=where,
                hint="only LoRA on the attention and MLP projections converts to GGUF",
            ) from None
        if module not in LORA_TARGETS or which not in ("lora_A", "lora_B"):
            raise InputError(
                f"adapter tensor {key!r} has no llama.cpp LoRA form",
                file=where,
                hint=f"LoRA targets that convert: {', '.join(sorted(LORA_TARGETS))}",
            )
        pairs.setdefault(f"blk.{i}.{LORA_TARGETS[module]}.weight", {})[which] = np.asarray(w, dtype=np.float32)
    out: dict[str, np.ndarray] = {}
    for name, ab in sorted(pairs.items()):
        a, b = ab["lora_A"], ab["lora_B"]
        if name.endswith("attn_q.weight"):
            b = rope_permute(b, base_cfg["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            b = rope_permute(b, base_cfg["num_key_value_heads"])
        out[name + ".lora_a"], out[name + ".lora_b"] = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return out, float(cfg.get("lora_alpha", cfg.get("r", 8)))


def write_gguf_lora(
    adapter_dir: str | Path,
    base_dir: str | Path | None,
    path: str | Path,
    name: str = "adapter",
    base_cfg: dict | None = None,
) -> Path:
    """Write the PEFT LoRA folder ``adapter_dir`` (trained on the HF Llama folder ``base_dir``) as a GGUF
    LoRA adapter (F32) at ``path``: ``general.type = adapter``, ``adapter.type = lora``,
    ``adapter.lora.alpha``, tensors as ``lora_tensors`` describes. llama.cpp loads it with
    ``llama_adapter_lora_init`` on the base exported by ``write_gguf``."""
    import gguf

    if base_cfg is None:
        if base_dir is None:
            raise InputError("write_gguf_lora needs the base folder or its config", field="base_dir")
        base_cfg = json.loads((Path(base_dir) / "config.json").read_text())
    tensors, alpha = lora_tensors(adapter_dir, base_cfg)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    w.add_name(name)
    for tname, tensor in tensors.items():
        w.add_tensor(tname, tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    publish(tmp, path)
    return path


def publish(tmp: Path, path: Path) -> None:
    """fsync ``tmp`` (written by GGUFWriter, which opens its own file), rename it over ``path``, fsync the folder."""
    import os

    from ..atomic import fsync_dir

    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
