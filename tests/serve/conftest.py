"""Fixtures for serving tests: a workspace holding the tiny base, a dataset and adapters made with PEFT."""

from __future__ import annotations

import pytest
from serve_support import make_adapter  # noqa: E402


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
