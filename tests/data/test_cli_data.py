"""``finetrace data …`` in-process: import, list, show (with gaps), head, stats, diff, refusal exit codes."""

from __future__ import annotations

import json

from finetrace.cli import main

from .dataset_files import completion_rows, snapshot, write_jsonl


def _run(capsys, ws, *args):
    code = main(["--workspace", str(ws.root), "data", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_data_commands(workspace, tmp_path, capsys):
    rows = [{"question": r["prompt"], "answer": r["completion"]} for r in completion_rows(20)]
    p = write_jsonl(tmp_path / "qa.jsonl", rows)
    sheet = tmp_path / "sheet.yaml"
    sheet.write_text("source: unit test\nlicense: CC-BY-4.0\n", encoding="utf-8")
    code, out, err = _run(
        capsys,
        workspace,
        "import",
        str(p),
        "--name",
        "qa",
        "--map",
        "prompt=question",
        "--map",
        "completion=answer",
        "--datasheet",
        str(sheet),
        "--seed",
        "1",
        "--json",
    )
    assert code == 0, err
    info = json.loads(out)
    assert info["ref"] == "qa@1" and info["metadata"]["schema"] == "completion"
    assert info["metadata"]["counts"] == {"train": 16, "validation": 2, "test": 2}

    code, out, _ = _run(capsys, workspace, "list", "--json")
    assert [d["ref"] for d in json.loads(out)] == ["qa@1"]

    code, out, _ = _run(capsys, workspace, "show", "qa")
    assert code == 0
    assert "  source: unit test" in out and "  license: CC-BY-4.0" in out
    gaps = out.split("Gaps")[1].split("Measured")[0]
    assert "  owner: who is responsible" in gaps and "source:" not in gaps  # gaps listed, never invented

    code, out, _ = _run(capsys, workspace, "head", "qa", "-n", "2", "--json")
    assert len(json.loads(out)) == 2 and set(json.loads(out)[0]) == {"prompt", "completion"}

    code, out, _ = _run(capsys, workspace, "stats", "qa", "--json")
    assert json.loads(out)["rows_out"] == 20

    p2 = write_jsonl(tmp_path / "qa2.jsonl", rows[:15] + [{"question": "new one?", "answer": "yes"}])
    code, out, err = _run(
        capsys,
        workspace,
        "import",
        str(p2),
        "--name",
        "qa",
        "--map",
        "prompt=question",
        "--map",
        "completion=answer",
        "--quiet",
    )
    assert code == 0 and out.startswith("qa@2 "), err
    code, out, _ = _run(capsys, workspace, "diff", "qa@1", "qa@2", "--json")
    d = json.loads(out)
    assert d["rows"]["added"] == 1 and d["rows"]["removed"] == 5 and d["rows"]["common"] == 15


def test_cli_refused_import_exit_code_and_message(workspace, tmp_path, capsys):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 3}\n', encoding="utf-8")
    before = snapshot(workspace)
    code, out, err = _run(capsys, workspace, "import", str(p), "--name", "bad")
    assert code == 2
    assert f"error: {p}:2 field 'completion': 'completion' must be a string, got int 3" in err
    assert snapshot(workspace) == before
    code, _, err = _run(capsys, workspace, "import", str(p), "--name", "bad", "--pii", "nope")
    assert code == 2 and "bad --pii 'nope'" in err
