"""adapter_record: the one query of an adapter's recorded facts (audit facts and market packages use it)."""

from __future__ import annotations

import json

import pytest

from finetrace.errors import IntegrityError, NotFoundError
from finetrace.ledger.adapter import adapter_record


def _folder(ws, tmp_path, name, files):
    d = tmp_path / name
    d.mkdir()
    for n, text in files.items():
        (d / n).write_text(text)
    return ws.store.put_dir(d)


def test_record_follows_base_run_datasets_parents_and_reports(workspace, tmp_path):
    ws = workspace
    base = _folder(ws, tmp_path, "base", {"config.json": "{}"})
    ds = _folder(ws, tmp_path, "ds", {"train.parquet": "rows"})
    ghost = "sha256:" + "ab" * 32  # a parent this workspace never recorded
    with ws.ledger.run("convert", config={}) as run:
        run.output("base_model", base, name="base")
    with ws.ledger.run("import", config={}) as run:
        run.output("dataset", ds, name="data")
    meta = {"base_model": base, "dataset": ds}
    ad = _folder(ws, tmp_path, "ad", {"finetrace_adapter.json": json.dumps(meta), "w.bin": "w"})
    with ws.ledger.run("train", config={}, inputs=[base, ds]) as run:
        run.output("adapter", ad, name="lora", metadata={"parent": ghost})
    rep = _folder(ws, tmp_path, "rep", {"report.json": "{}"})
    with ws.ledger.run("evaluate", config={}, inputs=[ad]) as run:
        run.output("eval_report", rep, name="eval")
    rec = adapter_record(ws, ad)
    assert rec.meta == meta and rec.base_digest == base and rec.base.digest == base
    assert rec.run.kind == "train" and [a.digest for a in rec.datasets] == [ds]  # the base is not a dataset
    assert rec.parents == [ghost] and [a.digest for a in rec.eval_reports] == [rep]
    with pytest.raises(NotFoundError):
        adapter_record(ws, ghost)
    entry = next(e for e in ws.store.tree(ad) if e.path == "finetrace_adapter.json")
    obj = ws.store.path(entry.digest)
    obj.chmod(0o644)
    obj.write_text("{}")
    with pytest.raises(IntegrityError):  # a changed file is damage, never "no metadata"
        adapter_record(ws, ad)
