"""Fixtures for the models stage: a private cache, and a tiny GGUF written with the ``gguf`` package.

``write_gguf`` exports the session's tiny Llama (``tiny_model_dir``) the way llama.cpp's converter does:
llama.cpp tensor names, the Q/K rope permutation, F32 data, and a gpt2-style BPE tokenizer in the
metadata (tokens, token types, merges, bos/eos/pad ids, ChatML template). transformers must undo all of
that on load, which is what the tests check against the original weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from finetrace.models.tiny import CHATML

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
    """llama.cpp's ``LlamaModel.permute``: interleave the two rotary halves of each head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """The tiny model's weights under llama.cpp names, permuted as llama.cpp writes them."""
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    hf = load_file(model_dir / "model.safetensors")
    out = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    if "lm_head.weight" in hf:
        out["output.weight"] = hf["lm_head.weight"]
    for i in range(cfg["num_hidden_layers"]):
        for hf_name, gg_name in LAYER_NAMES.items():
            w = hf[f"model.layers.{i}.{hf_name}"]
            if gg_name == "attn_q.weight":
                w = rope_permute(w, cfg["num_attention_heads"])
            elif gg_name == "attn_k.weight":
                w = rope_permute(w, cfg["num_key_value_heads"])
            out[f"blk.{i}.{gg_name}"] = np.ascontiguousarray(w, dtype=np.float32)
    return out


def write_gguf(model_dir: Path, path: Path, chat_template: str = CHATML) -> Path:
    import gguf

    cfg = json.loads((model_dir / "config.json").read_text())
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = dict(tj["model"]["vocab"])
    for added in tj["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == cfg["vocab_size"] and [vocab[t] for t in tokens] == list(range(len(tokens)))
    special = {a["content"] for a in tj["added_tokens"] if a["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("finetrace tiny llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(chat_template)
    for name, tensor in gguf_tensors(model_dir).items():
        w.add_tensor(name, tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def _models_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("finetrace-cache")


@pytest.fixture(autouse=True)
def models_cache(_models_cache, monkeypatch):
    """Every test here uses a private cache (conversions are shared within the session, by GGUF digest)."""
    monkeypatch.setenv("FINETRACE_CACHE", str(_models_cache))
    return _models_cache


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    """A GGUF file holding the session's tiny model and its tokenizer (F32, llama.cpp layout)."""
    return write_gguf(Path(tiny_model_dir), tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")
