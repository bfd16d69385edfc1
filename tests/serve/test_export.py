"""Merged export: transformers loads it, and it answers like the adapter served on the base (greedy)."""

from __future__ import annotations

import json

import pytest

from finetrace.serve.engine import Engine
from finetrace.serve.export import export_merged
from finetrace.serve.settings import ServeSettings

PROMPTS = ["hello", "The supplier shall deliver the goods", "Question: What is the capital of France?"]


def test_merged_export_matches_served_adapter(served_ws, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    res = export_merged(served_ws, "alpha@1", out)
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "finetrace_export.json" in files and "tokenizer.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))]
    meta = json.loads((out / "finetrace_export.json").read_text())
    assert meta["adapter"] == served_ws.ledger.resolve("alpha@1").digest
    run = served_ws.ledger.get_run(res["run"])
    assert run.kind == "export" and meta["adapter"] in run.inputs and res["digest"] in run.outputs

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(out)
    eng = Engine(served_ws, "tiny", ["alpha@1"], ServeSettings())
    eng.start()
    try:
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt")
            with torch.no_grad():
                gen = model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
            merged_text = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
            served = eng.generate("alpha@1", prompt=p, max_tokens=10)
            base = eng.generate("tiny", prompt=p, max_tokens=10)
            assert served.text == merged_text
            if p == PROMPTS[0]:
                assert base.text != merged_text  # the merge really carries the adapter
    finally:
        eng.stop()


def test_export_refuses_non_empty_folder(served_ws, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    from finetrace.errors import InputError

    with pytest.raises(InputError, match="not empty"):
        export_merged(served_ws, "alpha@1", tmp_path / "x")


def test_export_cli(served_ws, tmp_path, capsys):
    from finetrace.cli import main

    assert (
        main(
            [
                "--workspace",
                str(served_ws.root),
                "export-model",
                "beta@1",
                "--merged",
                "-o",
                str(tmp_path / "m"),
                "--json",
            ]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["adapter"] == served_ws.ledger.resolve("beta@1").digest
    assert served_ws.ledger.resolve(doc["ref"]).kind == "model"


def test_gguf_export_reloads_with_identical_logits(served_ws, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "gg"
    export_merged(served_ws, "beta@1", out, gguf="f32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, use_safetensors=True)
    from_gguf = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The supplier shall deliver the goods", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = merged(ids).logits, from_gguf(ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    gguf_tok = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    assert gguf_tok("hello world")["input_ids"] == tok("hello world")["input_ids"]
