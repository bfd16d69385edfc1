"""Provenance never turns a failed integrity check into absence: a changed datasheet is an error."""

from __future__ import annotations

import json
import os

import pytest

from finetrace.errors import IntegrityError
from finetrace.serve.provenance import resolve
from finetrace.serve.requestlog import EVENT


def _served(ws, tmp_path, with_sheet: bool = True) -> tuple[str, str]:
    """A dataset -> train -> adapter chain and one served answer; (dataset digest, provenance id)."""
    folder = tmp_path / ("ds" if with_sheet else "ds-bare")
    folder.mkdir()
    (folder / "train.parquet").write_bytes(b"rows")
    if with_sheet:
        (folder / "datasheet.json").write_text(json.dumps({"given": {"license": "cc-by-4.0"}}))
    ds = ws.store.put_dir(folder)
    with ws.ledger.run("import", config={}) as run:
        run.output("dataset", ds, name="clauses")
    ad_folder = tmp_path / f"adapter-{folder.name}"
    ad_folder.mkdir()
    (ad_folder / "adapter_model.safetensors").write_bytes(folder.name.encode())
    ad = ws.store.put_dir(ad_folder)
    with ws.ledger.run("train", config={}, inputs=[ds]) as run:
        run.output("adapter", ad, name=f"lora-{folder.name}")
    pid = f"prov-{folder.name}"
    ws.ledger.append(EVENT, {"provenance_id": pid, "adapter": ad, "base_model": None, "model": "m"})
    return ds, pid


def test_datasheet_is_read_and_a_changed_one_raises(workspace, tmp_path):
    ds, pid = _served(workspace, tmp_path)
    doc = resolve(workspace, pid)
    assert [d["digest"] for d in doc["datasets"]] == [ds]
    assert doc["datasets"][0]["datasheet"] == {"given": {"license": "cc-by-4.0"}}
    sheet = next(e for e in workspace.store.tree(ds) if e.path == "datasheet.json")
    obj = workspace.store.path(sheet.digest)
    os.chmod(obj, 0o644)
    obj.write_text(json.dumps({"given": {"license": "proprietary"}}))
    with pytest.raises(IntegrityError, match=sheet.digest):
        resolve(workspace, pid)


def test_no_datasheet_is_absence_not_an_error(workspace, tmp_path):
    _, pid = _served(workspace, tmp_path, with_sheet=False)
    assert resolve(workspace, pid)["datasets"][0]["datasheet"] is None
