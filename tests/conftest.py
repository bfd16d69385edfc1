"""Shared fixtures: a tiny random Llama model (built once per session), a fresh workspace per test.

Torch runs one thread per test process (``OMP_NUM_THREADS=1``, inherited by the CLI and training children the
tests start, and honoured by ``train()`` when a config sets no ``threads``): the tiny models are far too
small to gain from a second thread, and on a shared 2-core machine two spinning OpenMP threads per process
made training tests 3-4x slower. A test that needs more threads sets them itself.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
if "FINETRACE_WITNESS_DIR" not in os.environ:  # external ledger witnesses of test workspaces: not in ~
    import atexit
    import shutil
    import tempfile

    os.environ["FINETRACE_WITNESS_DIR"] = tempfile.mkdtemp(prefix="finetrace-witness-")
    atexit.register(shutil.rmtree, os.environ["FINETRACE_WITNESS_DIR"], True)


# Fixtures that run a whole pipeline on the tiny model (import, train, evaluate, documents: ~15 s per test
# worker): a test that needs one is slow, whatever its own body costs.
PIPELINE_FIXTURES = {"audit_golden", "console_env"}


def pytest_itemcollected(item):
    if PIPELINE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A folder with a tiny LlamaForCausalLM (safetensors), a BPE tokenizer and a ChatML template."""
    from finetrace.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def workspace(tmp_path):
    """A freshly initialised workspace in a temporary folder."""
    from finetrace.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws")
    yield ws
    ws.close()
