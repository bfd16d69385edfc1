"""``finetrace data forget``: a new version without the rows and their near-duplicates, the downstream
artifacts named from the lineage, an ``erasure`` run with row digests only, purge, verify, documents."""

from __future__ import annotations

import json
import random

import pytest

from finetrace.cli import main
from finetrace.data import import_dataset
from finetrace.errors import InputError
from finetrace.ledger import verify_workspace

from .dataset_files import all_rows, write_jsonl

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def rows(n: int = 30) -> list[dict]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) + str(rng.randint(0, 99)) for _ in range(14)) + f" customer {i} says hello"
        out.append({"id": f"r{i}", "prompt": text, "completion": f"answer {i}"})
    # a near-duplicate of r3 under another id (one word changed): it goes with r3
    out.append({"id": "r3-copy", "prompt": out[3]["prompt"].replace("hello", "hullo"), "completion": "answer 3"})
    return out


@pytest.fixture
def imported(workspace, tmp_path):
    return import_dataset(
        workspace, [write_jsonl(tmp_path / "d.jsonl", rows())], "people", splits=(0.8, 0.2, 0), near_dup_threshold=0.7
    )


def test_forget_ids_removes_rows_and_near_duplicates_and_purges(workspace, tmp_path, imported, capsys):
    ws = workspace
    # something built on the old version: an eval-like artifact and a deploy run that used it
    with ws.ledger.run("evaluate", config={"k": 1}, inputs=[imported.digest]) as run:
        report = run.output("eval_report", ws.store.put_bytes(b'{"report": 1}'), name="people-eval")
    with ws.ledger.run("deploy", config={"mode": "record"}, inputs=[report.digest]):
        pass
    (tmp_path / "ids.txt").write_text("r3\nr5\n\nr7\n")
    old_files = [e.digest for e in ws.store.tree(imported.digest) if e.path.endswith(".parquet")]
    code = main(
        [
            "--workspace",
            str(ws.root),
            "data",
            "forget",
            "people@1",
            "--ids",
            str(tmp_path / "ids.txt"),
            "--by",
            "Dana DPO",
            "--purge",
            "--json",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    res = json.loads(out.out)
    assert (res["dataset"], res["removed"], res["near_duplicates"]) == ("people@2", 3, 1)
    kept = all_rows(ws, "people@2")
    assert sorted(r["id"] for r in kept) == sorted(
        r["id"] for r in rows() if r["id"] not in {"r3", "r5", "r7", "r3-copy"}
    )
    assert {(a["kind"], a.get("ref")) for a in res["downstream"] if "ref" in a} == {("eval_report", "people-eval@1")}
    assert [a["kind"] for a in res["downstream"] if "run" in a] == ["deploy"]
    run = ws.ledger.get_run(ws.ledger.artifact(res["digest"]).run_id)
    assert run.kind == "erasure" and run.config["requester"] == "Dana DPO" and len(run.metrics["row_sha256"]) == 4
    ledger_text = "".join(str(b) for (b,) in ws.ledger.conn.execute("SELECT body FROM entries"))
    assert "customer 5 says" not in ledger_text  # digests only, never the text
    shared = {e.digest for e in ws.store.tree(res["digest"])}  # an untouched split's file stays, shared
    assert set(res["purged"]) >= set(old_files) - shared and set(old_files) - shared
    assert not any(ws.store.has(d) for d in res["purged"]) and not set(res["purged"]) & shared
    assert set(ws.ledger.get_run(imported.run_id).inputs) <= set(res["purged"])  # the source file too
    report = verify_workspace(ws)
    assert report.ok, report.problems
    assert report.checks["purged"] == len(res["purged"])
    # a missing object that was not purged on purpose is still a finding
    some = next(e.digest for e in ws.store.tree(res["digest"]) if e.path == "dataset.json")
    ws.store.path(some).unlink()
    assert not verify_workspace(ws).ok


def test_forget_selectors_and_errors(workspace, imported):
    from finetrace.data.erasure import forget

    res = forget(workspace, "people@1", match="CUSTOMER 12 SAYS", by="A")
    assert res["removed"] == 1 and "r12" not in {r["id"] for r in all_rows(workspace, res["dataset"])}
    res = forget(workspace, res["dataset"], where="id == 'r20'", by="A")
    assert res["removed"] == 1 and res["dataset"] == "people@3"
    with pytest.raises(InputError, match="no row of people@3 matches"):
        forget(workspace, "people@3", match="nobody at all", by="A")
    with pytest.raises(InputError, match="the dataset does not have"):
        forget(workspace, "people@3", where="email == 'x'", by="A")
    with pytest.raises(InputError, match="exactly one of"):
        forget(workspace, "people@3", match="a", where="id == 'r1'", by="A")
    with pytest.raises(InputError, match="names who asked"):
        forget(workspace, "people@3", match="customer 1 ", by=" ")


@pytest.mark.slow
def test_retrained_adapter_documents_record_the_erasure(workspace, tiny_model_dir, imported):
    from finetrace.audit import generate_documents
    from finetrace.data.erasure import forget
    from finetrace.models import add_folder
    from finetrace.train import TrainConfig, train

    add_folder(workspace, tiny_model_dir, name="tiny")
    new = forget(workspace, "people@1", match="customer 4 says", by="Dana DPO")
    art = train(
        workspace,
        TrainConfig(
            base_model="tiny",
            dataset=new["dataset"],
            output_name="people-lora",
            batch_size=4,
            max_steps=2,
            checkpoint_every=None,
            threads=1,
            compile=False,
        ),
    )
    docs = generate_documents(workspace, art.ref)
    texts = {
        d.ref: (workspace.store.materialize(d.digest) if workspace.store.is_tree(d.digest) else None) for d in docs
    }
    annex = [p for folder in texts.values() if folder for p in folder.rglob("*annex*.md")]
    assert annex and "erasure" in annex[0].read_text()
