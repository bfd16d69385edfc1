"""Fixtures for the audit tests: one real pipeline run on the tiny model, copied per test.

``audit_golden`` runs import -> train -> evaluate -> approve -> docs once per test session through the
stages' public entry points (once for all pytest-xdist workers of the session: the first worker to need
it builds it in the session's shared temporary folder, under a lock; the others read it); ``audit_env``
gives each test its own copy of that workspace (a folder copy), so tests that add entries or tamper with
files never see each other's changes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ..conftest import built_once
from .pipeline import build


def _build_golden(root: Path, model_dir: Path) -> dict:
    from finetrace.audit import approve, generate_documents
    from finetrace.workspace import Workspace

    ws = Workspace.init(root / "ws")
    refs = build(ws, model_dir, root / "inputs")
    approve(ws, refs["adapter"].ref, "Ada Lovelace", "checked accuracy, group and counterfactual results")
    generate_documents(ws, refs["adapter"].ref, intended_use=refs["intended_use"], formats=("md", "html"))
    ws.close()
    return {
        "refs": {k: str(getattr(v, "ref", v)) for k, v in refs.items()},
        "digests": {k: v.digest for k, v in refs.items() if hasattr(v, "digest")},
        "intended_use": str(refs["intended_use"]),
    }


@pytest.fixture(scope="session")
def audit_golden(tiny_model_dir, tmp_path_factory):
    """{"root", "refs", "digests", "intended_use"} of the golden pipeline run (read-only: copy it)."""
    root, info = built_once(tmp_path_factory, "audit-golden", lambda root: _build_golden(root, tiny_model_dir))
    info["refs"]["intended_use"] = info["intended_use"] = Path(info["intended_use"])
    return {"root": root, **info}


@pytest.fixture
def audit_env(audit_golden, tmp_path):
    """(workspace copy, golden info) for one test."""
    from finetrace.workspace import Workspace

    shutil.copytree(audit_golden["root"] / "ws", tmp_path / "ws")
    ws = Workspace.open(tmp_path / "ws")
    yield ws, audit_golden
    ws.close()
