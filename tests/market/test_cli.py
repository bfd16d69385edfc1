"""The `finetrace market` commands, in process, against a real registry server."""

from __future__ import annotations

import json

import pytest

from finetrace.cli import main


def test_add_user_prints_a_token_once_and_stores_its_hash(tmp_path, capsys):
    import sqlite3

    db = f"sqlite:///{tmp_path / 'r.db'}"
    assert (
        main(["market", "add-user", "bob", "--namespace", "bob-labs", "--db", db, "--store", str(tmp_path / "s")]) == 0
    )
    token = capsys.readouterr().out.strip()
    assert token.startswith("ftm_") and len(token) > 40
    rows = sqlite3.connect(tmp_path / "r.db").execute("SELECT name, token_hash FROM accounts").fetchall()
    assert rows[0][0] == "bob" and token not in rows[0][1] and len(rows[0][1]) == 64
    assert main(["market", "add-user", "bob", "--db", db, "--store", str(tmp_path / "s")]) != 0
    assert "account 'bob' exists" in capsys.readouterr().err


@pytest.mark.slow
def test_publish_search_pull_from_the_command_line(market, server, capsys):
    if server.kind != "sqlite":
        pytest.skip("the CLI path is the same for every database; it runs against SQLite")
    pub, buyer = str(market.pub.root), str(market.buyer.root)
    assert (
        main(
            [
                "-w",
                pub,
                "market",
                "publish",
                "legal-lora",
                "--to",
                "acme/cli-clauses@1.0",
                "--registry",
                server.url,
                "--token",
                server.tokens["acme"],
                "--domain",
                "legal",
                "--task",
                "classification",
                "--description",
                "Clause classifier from the CLI",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("published acme/cli-clauses@1.0")
    assert (
        main(
            [
                "market",
                "search",
                "clause",
                "--registry",
                server.url,
                "--domain",
                "legal",
                "--min-metric",
                "accuracy>=0.9",
                "--json",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert [r["ref"] for r in res["results"]] == ["acme/cli-clauses@1.0"]
    assert main(["-w", buyer, "market", "pull", "acme/cli-clauses@1.0", "--registry", server.url]) == 3
    assert "--trust-key" in capsys.readouterr().err
    assert (
        main(
            [
                "-w",
                buyer,
                "market",
                "pull",
                "acme/cli-clauses@1.0",
                "--registry",
                server.url,
                "--trust-key",
                market.pub.keys.key_id,
                "--name",
                "legal-from-market",
            ]
        )
        == 0
    )
    assert "as legal-from-market@1" in capsys.readouterr().out
    assert (
        main(
            [
                "-w",
                pub,
                "market",
                "publish",
                "legal-lora",
                "--to",
                "acme/cli-clauses@1.0",
                "--registry",
                server.url,
                "--token",
                server.tokens["mallory"],
            ]
        )
        == 4
    )
    assert "may not publish into namespace 'acme'" in capsys.readouterr().err
