"""Fixtures for serving tests: a workspace holding the tiny base, a dataset and adapters made with PEFT."""

from __future__ import annotations

import pytest

from .serve_support import make_adapter  # noqa: E402


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


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir):
    """A PeftModel on the tiny base with adapters `alpha` and `beta` (LoRA on every projection, non-zero B)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)  # lora_A is drawn by peft: the same adapters whatever ran before in this process
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0), adapter_name="alpha"
    )
    peft.add_adapter("beta", LoraConfig(r=2, lora_alpha=4, target_modules=targets[:4], lora_dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return peft.eval(), tok
