"""GGUF path: a tiny GGUF written with the ``gguf`` package converts to a model with the same logits;
corrupt and truncated files are refused with a message naming the file, and the ledger stays unchanged."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from finetrace.canonical import sha256_file
from finetrace.errors import InputError
from finetrace.ledger import verify_workspace
from finetrace.models import add_model, load_model, model_path
from finetrace.models.gguf_file import check_gguf

from .conftest import gguf_tensors


def test_tiny_gguf_header_is_read_like_llama_cpp_wrote_it(tiny_gguf, tiny_model_dir):
    info = check_gguf(tiny_gguf)
    assert info.architecture == "llama"
    written = gguf_tensors(Path(tiny_model_dir))
    assert {t[0] for t in info.tensors} == set(written)
    assert {t[0]: t[1] for t in info.tensors} == {k: v.shape for k, v in written.items()}
    assert info.n_elements == sum(v.size for v in written.values())
    assert info.metadata["tokenizer.ggml.model"] == "gpt2"


@pytest.mark.slow
def test_add_gguf_converts_to_a_model_with_the_written_logits(workspace, tiny_gguf, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    art = add_model(workspace, tiny_gguf, name="tiny-gguf")
    assert art.kind == "base_model" and art.ref == "tiny-gguf@1"

    model, tok, _ = load_model(workspace, "tiny-gguf")
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    # The tokenizer rebuilt from GGUF metadata tokenises like the original, template and stop token included.
    text = ref_tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Paris."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert tok.chat_template == ref_tok.chat_template
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|im_end|>")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == ref_tok(text, add_special_tokens=False)["input_ids"]

    # Same weights after the llama.cpp Q/K permutation was undone: same logits.
    x = torch.tensor([ids])
    with torch.no_grad():
        got, want = model(x).logits, ref_model(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # ... and every tensor equals the one written (embedding shown; the logits cover the rest).
    torch.testing.assert_close(model.model.embed_tokens.weight, ref_model.model.embed_tokens.weight)

    # Stored as plain safetensors + tokenizer, no trace of the GGUF quantizer.
    path, _ = model_path(workspace, "tiny-gguf")
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert "quantization_config" not in (path / "config.json").read_text()

    m = art.metadata
    assert m["architecture"] == "LlamaForCausalLM"
    assert m["parameters"] == sum(p.numel() for p in ref_model.parameters())
    assert (m["hidden_size"], m["layers"], m["vocab_size"], m["context_length"], m["dtype"]) == (
        64,
        2,
        ref_model.config.vocab_size,
        512,
        "float32",
    )
    assert m["text_identity"]["eos_token"] == "<|im_end|>"


def test_gguf_lineage_and_idempotent_readd(workspace, tiny_gguf):
    led = workspace.ledger
    art = add_model(workspace, tiny_gguf, name="tiny-gguf")
    gguf_digest = sha256_file(tiny_gguf)
    assert art.metadata["source"]["digest"] == gguf_digest

    convert = led.get_run(art.run_id)
    assert convert.kind == "convert" and convert.status == "succeeded"
    assert convert.inputs == [gguf_digest]
    src = led.artifact(gguf_digest)
    assert src.kind == "source" and src.metadata["format"] == "gguf"
    assert workspace.store.has(gguf_digest)

    size = led.size()
    again = add_model(workspace, tiny_gguf, name="tiny-gguf")
    assert again.digest == art.digest and again.aliases == ["tiny-gguf@1"]
    assert led.size() == size  # nothing new recorded
    report = verify_workspace(workspace)
    assert report.ok, report.problems


def _ledger_unchanged_after_refusal(workspace, path: Path, expect: str) -> str:
    before = workspace.ledger.size()
    with pytest.raises(InputError) as info:
        add_model(workspace, path, name="broken")
    msg = str(info.value)
    assert str(path) in msg and expect in msg, msg
    assert "\n" not in msg
    assert workspace.ledger.size() == before
    return msg


@pytest.mark.parametrize("keep", [3, 20, 300, "half", -1])
def test_truncated_gguf_is_refused(workspace, tiny_gguf, tmp_path, keep):
    data = tiny_gguf.read_bytes()
    n = {"half": len(data) // 2}.get(keep, keep)
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:n])
    _ledger_unchanged_after_refusal(workspace, bad, "truncated")


def test_not_a_gguf_is_refused(workspace, tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    _ledger_unchanged_after_refusal(workspace, bad, "not a GGUF file")


def test_corrupt_gguf_header_is_refused(workspace, tiny_gguf, tmp_path):
    data = bytearray(tiny_gguf.read_bytes())
    # The first metadata entry: key length (u64) at byte 24, the key, then its value type (u32).
    (key_len,) = struct.unpack_from("<Q", data, 24)
    struct.pack_into("<I", data, 24 + 8 + key_len, 77)
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(bytes(data))
    msg = _ledger_unchanged_after_refusal(workspace, bad, "corrupt header")
    assert "unknown value type 77" in msg


def test_gguf_without_tokenizer_is_refused(workspace, tiny_model_dir, tmp_path):
    import gguf

    path = tmp_path / "notok.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _ledger_unchanged_after_refusal(workspace, path, "no tokenizer")
