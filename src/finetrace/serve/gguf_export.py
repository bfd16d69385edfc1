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
        raise InputError(f"GGUF export supports Llama-family models, not {cfg.get('model_type')!r}",
                         file=str(folder / "config.json"), field="model_type")
    if qtype not in ("f32", "q8_0"):
        raise InputError(f"unknown GGUF type {qtype!r}", hint="f32 or q8_0", field="--gguf-type")
    tj = json.loads((folder / "tokenizer.json").read_text())
    if tj.get("model", {}).get("type") != "BPE":
        raise InputError("GGUF export supports BPE tokenizers only", file=str(folder / "tokenizer.json"))
    tcfg = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").is_file() \
        else {}
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
    for key, adder in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                       ("pad_token", w.add_pad_token_id)):
        tok = tcfg.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok in vocab:
            adder(vocab[tok])
    w.add_add_bos_token(False)
    if template:
        w.add_chat_template(template)
    for tname, tensor in _tensors(folder, cfg).items():
        if qtype == "q8_0" and tensor.ndim == 2 and tensor.shape[-1] % 32 == 0:
            w.add_tensor(tname, gguf.quants.quantize(tensor, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(tname, tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
