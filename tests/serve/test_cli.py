"""The serve CLI faces: errors at the edge, API keys file parsing, provenance of an unknown id."""

from __future__ import annotations

from finetrace.cli import main
from finetrace.cli.serve import _read_keys


def test_serve_unknown_base_is_a_clean_error(served_ws, capsys):
    assert main(["--workspace", str(served_ws.root), "serve", "--base", "no-such-base"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no base_model named 'no-such-base'") and "tiny" in err


def test_serve_refused_adapter_exit_code(served_ws, capsys):
    # 'alpha' exists but as an adapter it cannot be a base
    assert main(["--workspace", str(served_ws.root), "serve", "--base", "alpha@1"]) == 2
    assert "is a adapter, not a base_model" in capsys.readouterr().err


def test_api_keys_file(tmp_path):
    f = tmp_path / "keys.txt"
    f.write_text("# team keys\nkey-one\n\n  key-two  \n")
    assert _read_keys(str(f)) == ["key-one", "key-two"]


def test_provenance_unknown_id(served_ws, capsys):
    assert main(["--workspace", str(served_ws.root), "provenance", "ftp-000"]) == 2
    assert "no served answer with provenance id" in capsys.readouterr().err


def test_export_requires_merged(served_ws, tmp_path, capsys):
    assert main(["--workspace", str(served_ws.root), "export-model", "alpha@1", "-o", str(tmp_path / "x")]) == 2
    assert "--merged" in capsys.readouterr().err
