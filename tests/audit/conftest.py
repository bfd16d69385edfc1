"""Fixtures for the audit tests: one real pipeline run on the tiny model, copied per test.

``audit_golden`` runs import -> train -> evaluate -> approve -> docs once per session through the
stages' public entry points; ``audit_env`` gives each test its own copy of that workspace (a folder
copy), so tests that add entries or tamper with files never see each other's changes.
"""

from __future__ import annotations

import shutil

import pytest

from .pipeline import build


@pytest.fixture(scope="session")
def audit_golden(tiny_model_dir, tmp_path_factory):
    from finetrace.audit import approve, generate_documents
    from finetrace.workspace import Workspace

    root = tmp_path_factory.mktemp("audit")
    ws = Workspace.init(root / "ws")
    refs = build(ws, tiny_model_dir, root / "inputs")
    approve(ws, refs["adapter"].ref, "Ada Lovelace", "checked accuracy, group and counterfactual results")
    generate_documents(ws, refs["adapter"].ref, intended_use=refs["intended_use"], formats=("md", "html"))
    ws.close()
    return {
        "root": root,
        "refs": {k: getattr(v, "ref", v) for k, v in refs.items()},
        "digests": {k: v.digest for k, v in refs.items() if hasattr(v, "digest")},
        "intended_use": refs["intended_use"],
    }


@pytest.fixture
def audit_env(audit_golden, tmp_path):
    """(workspace copy, golden info) for one test."""
    from finetrace.workspace import Workspace

    shutil.copytree(audit_golden["root"] / "ws", tmp_path / "ws")
    ws = Workspace.open(tmp_path / "ws")
    yield ws, audit_golden
    ws.close()
