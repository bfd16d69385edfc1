"""``finetrace data import --from-hub ID[@revision]`` offline, on a folder laid out like the hub cache."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finetrace.cli import main
from finetrace.data import open_dataset

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, repo="acme/tickets", commit=COMMIT):
    """The layout huggingface_hub writes: datasets--ORG--NAME/{refs/main, snapshots/COMMIT/...}."""
    base = root / f"datasets--{repo.replace('/', '--')}"
    data = base / "snapshots" / commit / "data"
    data.mkdir(parents=True)
    rows = [
        {"text": f"ticket {i}: my invoice {i} is wrong", "label": "billing" if i % 2 else "shipping"} for i in range(40)
    ]
    pq.write_table(pa.Table.from_pylist(rows[:30]), data / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[30:]), data / "test-00000-of-00001.parquet")
    (base / "snapshots" / commit / "README.md").write_text("# tickets\n")
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    return root


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache(tmp_path / "hub")))


def _run(capsys, ws, *args):
    code = main(["--workspace", str(ws.root), "data", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_import_from_hub_records_id_revision_and_commit(workspace, offline_hub, capsys):
    code, out, err = _run(
        capsys, workspace, "import", "--from-hub", "acme/tickets", "--name", "tickets", "--splits", "0.9,0.1,0"
    )
    assert code == 0, err
    assert f"format native (detected by content); from the Hub acme/tickets at commit {COMMIT}" in out
    _, info, art = open_dataset(workspace, "tickets@1")
    assert info["counts"]["test"] == 10 and info["schema"] == "classification"
    assert [s["file"] for s in info["sources"]] == ["test-00000-of-00001.parquet", "train-00000-of-00001.parquet"]
    run = workspace.ledger.get_run(art.run_id)
    assert run.config["from_hub"] == {"id": "acme/tickets", "revision": "main", "commit": COMMIT}
    code, _, _ = _run(capsys, workspace, "import", "--from-hub", f"acme/tickets@{COMMIT}", "--name", "pinned")
    assert code == 0


def test_from_hub_errors_name_the_problem(workspace, offline_hub, capsys):
    code, _, err = _run(capsys, workspace, "import", "--from-hub", "acme/absent", "--name", "x")
    assert code != 0 and "acme/absent is not in the local cache" in err and "huggingface-cli download" in err
    code, _, err = _run(capsys, workspace, "import", "--from-hub", "not a repo", "--name", "x")
    assert code != 0 and "bad --from-hub 'not a repo'" in err
    assert list(workspace.ledger.artifacts()) == []
