"""HF folders (safetensors only, no custom code), hub ids offline, generation and the CLI faces."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from finetrace.cli import main
from finetrace.errors import DependencyError, InputError
from finetrace.models import add_model, load_model
from finetrace.models.generate import ChatStats, chat_messages, generate, stream_chat


@pytest.fixture
def tiny_copy(tiny_model_dir, tmp_path):
    dest = tmp_path / "tiny-copy"
    shutil.copytree(tiny_model_dir, dest)
    return dest


def test_folder_is_stored_without_extra_files(workspace, tiny_copy):
    (tiny_copy / "README.md").write_text("notes")
    (tiny_copy / "training_args.bin").write_bytes(b"\x80\x04pickle")
    art = add_model(workspace, tiny_copy, name="tiny")
    files = {e.path for e in workspace.store.tree(art.digest)}
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert "README.md" not in files and "training_args.bin" not in files
    assert workspace.ledger.get_run(art.run_id).kind == "import"
    # same files again under the same name: same artifact, nothing recorded
    size = workspace.ledger.size()
    assert add_model(workspace, tiny_copy, name="tiny").digest == art.digest
    assert workspace.ledger.size() == size


def test_pickle_weights_are_refused(workspace, tiny_copy):
    (tiny_copy / "model.safetensors").unlink()
    (tiny_copy / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(InputError, match="pickle format .*pytorch_model.bin.*safetensors only"):
        add_model(workspace, tiny_copy, name="tiny")
    assert workspace.ledger.size() == 1  # only workspace.created


def test_custom_code_is_refused(workspace, tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="never runs remote code"):
        add_model(workspace, tiny_copy, name="tiny")


def test_truncated_safetensors_is_refused(workspace, tiny_copy):
    w = tiny_copy / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(InputError, match="truncated safetensors") as info:
        add_model(workspace, tiny_copy, name="tiny")
    assert str(w) in str(info.value)


def test_hub_id_offline_gives_a_clear_error(workspace, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DependencyError, match="cannot fetch 'someorg/somemodel' from the Hugging Face Hub"):
        add_model(workspace, "someorg/somemodel")


def _greedy_reference(model_dir, prompt, n):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = tok.apply_chat_template(chat_messages(prompt), tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )
    new = out[0, ids.shape[1] :].tolist()
    return new, tok.decode(new, skip_special_tokens=True)


def test_generate_streams_the_greedy_answer(workspace, tiny_model_dir):
    add_model(workspace, tiny_model_dir, name="tiny")
    want_ids, want_text = _greedy_reference(tiny_model_dir, "hello world", 12)
    stats = ChatStats()
    pieces = list(generate(workspace, "tiny", "hello world", max_new_tokens=12, stats=stats))
    assert "".join(pieces) == want_text.strip()  # the served answer: surrounding whitespace removed
    assert stats.token_ids == want_ids and stats.new_tokens == len(want_ids)
    assert stats.finish_reason == ("stop" if want_ids[-1] == 2 else "length")


def test_stream_stops_at_eos(tiny_model_dir, workspace):
    """Make the end-of-turn token always win: generation stops after exactly that one token."""
    add_model(workspace, tiny_model_dir, name="tiny")
    model, tok, _ = load_model(workspace, "tiny")
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 10.0
    model.lm_head = head
    stats = ChatStats()
    text = "".join(stream_chat(model, tok, chat_messages("hi"), max_new_tokens=50, stats=stats))
    assert text == "" and stats.token_ids == [tok.eos_token_id] and stats.finish_reason == "stop"


def test_cli_models_list_json_and_generate(workspace, tiny_model_dir, capsys):
    ws = str(workspace.root)
    assert main(["-w", ws, "models", "add", str(tiny_model_dir), "--name", "tiny"]) == 0
    capsys.readouterr()
    assert main(["-w", ws, "models", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["tiny@1"]
    assert rows[0]["architecture"] == "LlamaForCausalLM" and rows[0]["source"]["type"] == "folder"
    assert rows[0]["parameters"] == sum(p.numel() for p in load_model(workspace, "tiny")[0].parameters())

    _, want_text = _greedy_reference(tiny_model_dir, "What is the capital of France?", 8)
    assert (
        main(["-w", ws, "generate", "--model", "tiny", "What is the capital of France?", "--max-new-tokens", "8"]) == 0
    )
    assert capsys.readouterr().out == want_text.strip() + "\n"


def test_cli_errors_are_one_line(workspace, tmp_path, capsys):
    rc = main(["-w", str(workspace.root), "models", "add", "smollm3-1b"])
    err = capsys.readouterr().err
    assert rc != 0 and err.startswith("error: unknown model 'smollm3-1b'") and err.count("\n") == 1
    assert "smollm2-135m-instruct" in err

    rc = main(["-w", str(tmp_path / "no-workspace"), "models", "list"])
    err = capsys.readouterr().err
    assert rc != 0 and err.startswith("error: no finetrace workspace") and err.count("\n") == 1

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\0\0\0" + b"\0" * 8)
    rc = main(["-w", str(workspace.root), "models", "add", str(bad)])
    err = capsys.readouterr().err
    assert rc != 0 and str(bad) in err and "truncated" in err and err.count("\n") == 1

    rc = main(["-w", str(workspace.root), "generate", "--model", "nothing-here", "hi"])
    err = capsys.readouterr().err
    assert rc != 0 and "no base_model named 'nothing-here'" in err


def test_hub_id_fetches_only_safe_files_and_pins_the_commit(workspace, tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    seen = {}

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, cache_dir=None, **kw):
        seen.update(repo_id=repo_id, allow=allow_patterns)
        snap = tmp_path / "hub" / "snapshots" / commit
        shutil.copytree(tiny_model_dir, snap)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    art = add_model(workspace, "someorg/tiny-llama")
    assert art.ref == "someorg/tiny-llama@1" and seen["repo_id"] == "someorg/tiny-llama"
    assert "*.safetensors" in seen["allow"] and not any(p.endswith((".bin", ".py")) for p in seen["allow"])
    src = art.metadata["source"]
    assert (src["type"], src["repo_id"], src["revision"]) == ("hub", "someorg/tiny-llama", commit)
    assert workspace.ledger.get_run(art.run_id).config["revision"] == commit


def test_generate_with_a_peft_adapter(workspace, tiny_model_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    add_model(workspace, tiny_model_dir, name="tiny")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, cfg).eval()
    folder = tmp_path / "adapter"
    peft_model.save_pretrained(folder)
    assert (folder / "adapter_model.safetensors").is_file()

    text = tok.apply_chat_template(chat_messages("hello"), tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        tuned_logits = peft_model(ids).logits
        with peft_model.disable_adapter():
            base_logits = peft_model(ids).logits
        want = peft_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=2, pad_token_id=2)[
            0, ids.shape[1] :
        ].tolist()
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-3)  # the adapter does something

    stats = ChatStats()
    "".join(generate(workspace, "tiny", "hello", max_new_tokens=6, adapter=folder, stats=stats))
    assert stats.token_ids == want

    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(InputError, match="safetensors only"):
        list(generate(workspace, "tiny", "hello", max_new_tokens=2, adapter=folder))
    rc = main(["-w", str(workspace.root), "generate", "--model", "tiny", "--adapter", "no-such-adapter", "hi"])
    assert rc != 0 and "no adapter named 'no-such-adapter'" in capsys.readouterr().err


def test_bad_alias_is_refused_before_anything_happens(workspace, tiny_model_dir):
    with pytest.raises(InputError, match="bad name"):
        add_model(workspace, tiny_model_dir, name="no spaces please")
    assert workspace.ledger.size() == 1 and list(workspace.store) == []
