"""The documented workflow end to end: an adapter trained, evaluated and documented by the real stages
(`finetrace docs`, whose attestation names each adapter file) publishes, shows a verified badge, and pulls
into another workspace as the same adapter. No fallback attestation is involved."""

from __future__ import annotations

import base64
import json

import pytest

from finetrace.cli import main


@pytest.mark.slow
def test_a_documented_adapter_publishes_and_pulls_verified(audit_env, tiny_model_dir, tmp_path, capsys):
    from finetrace.market import client
    from finetrace.market.registry import Settings
    from finetrace.market.server import BackgroundServer
    from finetrace.models import add_folder
    from finetrace.workspace import Workspace

    ws, g = audit_env
    adapter = g["refs"]["adapter"]
    assert main(["-w", str(ws.root), "docs", adapter, "--intended-use", str(g["intended_use"])]) == 0
    capsys.readouterr()
    buyer = Workspace.init(tmp_path / "buyer")
    add_folder(buyer, tiny_model_dir, "tiny")
    with BackgroundServer(Settings(db_url=f"sqlite:///{tmp_path / 'r.db'}", store=str(tmp_path / "store"))) as srv:
        token = srv.registry.add_user("acme")
        assert (
            main(
                [
                    "-w",
                    str(ws.root),
                    "market",
                    "publish",
                    adapter,
                    "--to",
                    "acme/routing@1.0",
                    "--registry",
                    srv.url,
                    "--token",
                    token,
                    "--domain",
                    "support",
                ]
            )
            == 0
        ), capsys.readouterr().err
        assert capsys.readouterr().out.startswith("published acme/routing@1.0")
        info = client._check(client._http(srv.url).get("/api/v1/packages/acme/routing/1.0"))
        assert info["badge"]["level"] == "verified", info["badge"]
        att = next(f for f in info["manifest"]["files"] if f["path"] == "attestation/attestation.dsse.json")
        env = json.loads(srv.registry.object_path(att["digest"]).read_bytes())
        stmt = json.loads(base64.b64decode(env["payload"]))
        assert stmt["predicateType"] == "https://slsa.dev/provenance/v1"  # the audit stage's, not a fallback
        assert {s["name"] for s in stmt["subject"]} == {
            f["path"][len("adapter/") :] for f in info["manifest"]["files"] if f["path"].startswith("adapter/")
        }
        assert (
            main(
                [
                    "-w",
                    str(buyer.root),
                    "market",
                    "pull",
                    "acme/routing@1.0",
                    "--registry",
                    srv.url,
                    "--trust-key",
                    ws.keys.key_id,
                ]
            )
            == 0
        ), capsys.readouterr().err
        srv.registry.close()
    pulled = buyer.ledger.resolve("acme/routing")
    assert pulled.digest == g["digests"]["adapter"]
    assert main(["-w", str(buyer.root), "verify"]) == 0
    buyer.close()
