"""`finetrace run` output published as is: the pipeline's adapter, documents and attestation pass the
registry (badge verified), the reports/ copies verify, and the pull gives the same adapter."""

from __future__ import annotations

import pytest

from finetrace.cli import main


def _pipeline_helpers():
    """tests/pipeline/test_pipeline.py's pipeline builder (that folder is not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "pipeline_helpers", Path(__file__).parents[1] / "pipeline" / "test_pipeline.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_a_pipeline_adapter_publishes_and_pulls(workspace, tiny_model_dir, tmp_path, capsys):
    from finetrace.ledger import verify_workspace
    from finetrace.market import client
    from finetrace.market.registry import Settings
    from finetrace.market.server import BackgroundServer
    from finetrace.models import add_folder
    from finetrace.workspace import Workspace

    path = _pipeline_helpers().make_pipeline(tmp_path, tiny_model_dir)
    assert main(["-w", str(workspace.root), "run", str(path)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    adapter = workspace.ledger.resolve("routing-lora", kind="adapter")
    copies = verify_workspace(workspace)
    assert copies.ok and copies.checks["report_copies"] > 0, copies.problems
    buyer = Workspace.init(tmp_path / "buyer")
    add_folder(buyer, tiny_model_dir, "tiny")
    with BackgroundServer(Settings(db_url=f"sqlite:///{tmp_path / 'r.db'}", store=str(tmp_path / "store"))) as srv:
        token = srv.registry.add_user("acme")
        res = client.publish(workspace, adapter.ref, "acme/routing@1.0", srv.url, token)
        assert res["status"] == "published"
        info = client._check(client._http(srv.url).get("/api/v1/packages/acme/routing/1.0"))
        assert info["badge"]["level"] == "verified", info["badge"]
        art = client.pull(buyer, "acme/routing@1.0", srv.url, trust_keys=[workspace.keys.key_id])
        srv.registry.close()
    assert art.digest == adapter.digest
    assert verify_workspace(buyer).ok
    buyer.close()
