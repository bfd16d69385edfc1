"""The CLI's core commands, in-process."""

import json

from finetrace.cli import main


def test_missing_workspace_is_one_clear_line(tmp_path, capsys):
    code = main(["-w", str(tmp_path / "none"), "log"])
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") == 1 and "no finetrace workspace at" in err and "finetrace init" in err


def test_init_verify_log_show_lineage(tmp_path, capsys):
    ws = str(tmp_path / "ws")
    assert main(["-w", ws, "init", "--json"]) == 0
    key = json.loads(capsys.readouterr().out)["key_id"]
    assert key.startswith("sha256:")
    from finetrace.workspace import Workspace

    w = Workspace.open(ws)
    with w.ledger.run("import", config={}) as run:
        art = run.output("dataset", w.store.put_bytes(b"x"), name="d")
    w.checkpoint()
    w.close()
    assert main(["-w", ws, "verify", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and rep["checks"]["objects"] == 1
    assert main(["-w", ws, "log", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["outputs"] == [art.digest]
    assert main(["-w", ws, "show", "d@1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["digest"] == art.digest
    assert main(["-w", ws, "lineage", "d", "--direction", "up"]) == 0
    out = capsys.readouterr().out
    assert "dataset d@1" in out and "run import-" in out
    # corrupt the object: verify exits non-zero and names it
    p = Workspace.open(ws).store.path(art.digest)
    p.chmod(0o644)
    p.write_bytes(b"y")
    assert main(["-w", ws, "verify"]) == 3
    assert art.digest in capsys.readouterr().err
