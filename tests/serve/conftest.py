"""Fixtures for serving tests: a workspace holding the tiny base, a dataset and adapters made with PEFT."""

from __future__ import annotations

import json

import pytest


def make_adapter(ws, base_art, tokenizer, base_dir, name: str, seed: int, tmp_path, dataset: str | None = None,
                 metadata: dict | None = None, r: int = 4):
    """Train-like: a LoRA adapter with random non-zero B, stored and recorded by a `train` run."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetrace.models.identity import text_identity

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"],
                     lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    out = tmp_path / f"adapter-{name}-{seed}"
    peft_model.save_pretrained(out, safe_serialization=True)
    ident = text_identity(tokenizer)
    (out / "finetrace_adapter.json").write_text(json.dumps({"base_model": base_art.digest, **ident}))
    if dataset is None:
        ds_dir = tmp_path / f"dataset-{name}-{seed}"
        ds_dir.mkdir()
        (ds_dir / "dataset.json").write_text(json.dumps({"schema": "completion", "counts": {"train": 1}}))
        (ds_dir / "datasheet.json").write_text(json.dumps({"title": f"{name} data", "license": "CC-BY-4.0"}))
        dataset = ws.ledger.add_artifact("dataset", ws.store.put_dir(ds_dir), name=f"{name}-data").digest
    meta = {"base_model": base_art.digest, "method": "lora", "r": r, **ident, **(metadata or {})}
    with ws.ledger.run("train", config={"method": "lora", "r": r, "seed": seed},
                       inputs=[base_art.digest, dataset], seed=seed) as run:
        art = run.output("adapter", ws.store.put_dir(out), name=name, metadata=meta)
    ws.checkpoint()
    return art


@pytest.fixture(scope="module")
def served_ws(tmp_path_factory, tiny_model_dir):
    """A workspace with base `tiny`, adapters `alpha@1` and `beta@1` (different random B), their datasets."""
    from transformers import AutoTokenizer

    from finetrace.models import add_folder
    from finetrace.workspace import Workspace

    tmp = tmp_path_factory.mktemp("serve")
    ws = Workspace.init(tmp / "ws")
    base = add_folder(ws, tiny_model_dir, "tiny")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    make_adapter(ws, base, tok, tiny_model_dir, "alpha", 1, tmp)
    make_adapter(ws, base, tok, tiny_model_dir, "beta", 2, tmp)
    ws.ctx = {"base": base, "tokenizer": tok, "tmp": tmp, "model_dir": tiny_model_dir}
    yield ws
    ws.close()
