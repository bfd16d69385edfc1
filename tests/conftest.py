"""Shared fixtures: a tiny random Llama model (built once per session), a fresh workspace per test.

Torch runs one thread per test process (``OMP_NUM_THREADS=1``, inherited by the CLI and training children the
tests start, and honoured by ``train()`` when a config sets no ``threads``): the tiny models are far too
small to gain from a second thread, and on a shared 2-core machine two spinning OpenMP threads per process
made training tests 3-4x slower. A test that needs more threads sets them itself.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

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


# The files that take longest (seconds on this machine, whole suite), started first. Under `-n 2 --dist
# loadfile` a file is one unit that one worker runs; xdist hands the files out in collection order (we turn
# off its own reordering, which puts the files with the most tests first and so left the few long files
# for the end while the other worker sat idle). Longest first, the short files fill in behind, so both
# workers end together. Order within a file is kept.
LONGEST_FIRST = (
    "tests/train/test_plan.py",  # ~90: six measured training runs
    "tests/core/test_chaos_kill.py",  # ~55: 20 SIGKILLs and resumes
    "tests/train/test_quant.py",
    "tests/train/test_resume.py",
    "tests/core/test_memory.py",
    "tests/serve/test_sigterm.py",
    "tests/web/test_screenshots.py",
    "tests/train/test_dpo.py",
    "tests/audit/test_render.py",
    "tests/market/test_chaos_kill.py",
    "tests/train/test_train.py",
    "tests/models/test_quant_load.py",
    "tests/market/test_web.py",
    "tests/market/test_hostile.py",
    "tests/serve/test_reliability.py",  # the longest of the quick set (~15)
)
# ...except these, last: two torchruns of 2 ranks each (~85 s) want both cores. Started beside another
# worker's tests, the ranks share one core and wait on each other at every collective: measured 1.5x
# slower, and everything beside them too.
LAST = ("tests/train/test_torchrun.py",)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {f: i for i, f in enumerate(LONGEST_FIRST)} | {f: len(LONGEST_FIRST) + 1 for f in LAST}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(LONGEST_FIRST)))  # stable


def built_once(tmp_path_factory, name: str, build: Callable[[Path], dict]) -> tuple[Path, dict]:
    """(folder, ``build(folder)``'s JSON-able result), built once per test session: under pytest-xdist the
    first worker that asks builds it in the session's shared temporary folder, under a lock, and every
    other worker reads it (copy the folder before writing to it)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's, shared by workers
    root, done = shared / name, shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            shutil.rmtree(root, ignore_errors=True)  # a build that failed half-way
            root.mkdir()
            done.write_text(json.dumps(build(root)))
    return root, json.loads(done.read_text())


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
