"""The pipeline end to end on the tiny model: a full run, a fully cached re-run, a data change, a gate."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import yaml

from finetrace.errors import ConfigError
from finetrace.pipeline import GateFailedError, load_pipeline, run_pipeline

WORDS = {"billing": "invoice", "technical": "crash", "account": "password"}
FILLER = ["the", "my", "a", "again", "today", "please", "help", "now"]


def write_rows(path: Path, n: int, seed: int, groups: bool = False) -> Path:
    """Rows of a routing task; ``groups`` adds a group column (only on the held-out test file: the data
    stage keeps a group's rows in one split and drops training rows that share a group with the test)."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "text", "label"] + (["group"] if groups else []))
        w.writeheader()
        for i in range(n):
            label = sorted(WORDS)[i % 3]
            filler = " ".join(rng.choice(FILLER) for _ in range(rng.randint(1, 3)))
            row = {
                "id": f"r{seed}-{i}",
                "text": f"order {rng.randint(100, 999)}: {filler} {WORDS[label]}",
                "label": label,
            }
            w.writerow({**row, "group": ["web", "phone"][i % 2]} if groups else row)
    return path


def make_pipeline(tmp: Path, model_dir: Path, gates: dict | None = None, deploy: str = "serve") -> Path:
    write_rows(tmp / "train.csv", 36, 0)
    write_rows(tmp / "test.csv", 9, 1, groups=True)
    (tmp / "datasheet.yaml").write_text("title: Routing tickets\nsource: synthetic\nlicense: CC0-1.0\n")
    (tmp / "intended_use.yaml").write_text("intended_use: Route tickets in tests.\nlimitations: Toy data.\n")
    (tmp / "suite.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "routing",
                "split": "test",
                "metrics": ["accuracy"],
                "scoring": "constrained",
                "bootstrap": {"samples": 50, "seed": 0},
                "forgetting": {"enabled": False},
                "bias": {"enabled": True, "categories": ["gender_names"], "max_examples": 3},
                "gates": gates or {"min_metric": {"accuracy": 0.0}, "max_flip_rate": 1.0},
            }
        )
    )
    doc = {
        "name": "routing",
        "model": {"source": str(model_dir), "name": "tiny"},
        "data": {
            "name": "tickets",
            "files": ["train.csv"],
            "test_file": "test.csv",
            "schema": "classification",
            "datasheet": "datasheet.yaml",
            "splits": [0.85, 0.15, 0.0],
            "near_dup_threshold": 1.0,
        },
        "train": {
            "max_steps": 2,
            "batch_size": 4,
            "lr": 5e-3,
            "threads": 1,
            "checkpoint_every": 1,
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        },
        "evaluate": {"suite": "suite.yaml"},
        "docs": {"intended_use": "intended_use.yaml"},
        "approve": {"by": "Ada Lovelace", "note": "checked the eval report"},
        "deploy": {"mode": deploy, "ask": "order 123: my invoice", "max_tokens": 3},
    }
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def runs_by_kind(ws) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in ws.ledger.runs():
        out[r.kind] = out.get(r.kind, 0) + 1
    return out


def stage_status(ws, run_id: str) -> dict[str, str]:
    return {
        e.data["stage"]: e.data["status"]
        for e in ws.ledger.entries(type="pipeline.stage")
        if e.data["run_id"] == run_id and e.data["status"] != "started"
    }


@pytest.mark.slow
def test_pipeline_runs_caches_and_reruns_on_data_change(workspace, tiny_model_dir, tmp_path):
    ws = workspace
    path = make_pipeline(tmp_path, tiny_model_dir)
    lines: list[str] = []

    # 1. everything runs
    first = run_pipeline(ws, path, progress=False, echo=lines.append)
    assert [s.status for s in first.stages] == ["ran"] * 7
    assert stage_status(ws, first.run_id) == {
        s: "ran" for s in ("model", "data", "train", "evaluate", "docs", "approve", "deploy")
    }
    kinds = runs_by_kind(ws)
    # import: the model folder and the data
    assert kinds == {"import": 2, "train": 1, "evaluate": 1, "document": 1, "deploy": 1, "parity": 1, "pipeline": 1}
    assert first.stage("deploy").metrics["serve_agreement"] == 1.0  # served == evaluated, token for token
    assert ws.ledger.get_run(first.run_id).status == "succeeded"
    adapter = ws.ledger.artifact(first.state["adapter"])
    assert adapter.kind == "adapter" and adapter.ref == "routing-lora@1"
    ev = first.stage("evaluate").metrics
    assert {"base_accuracy", "tuned_accuracy"} <= set(ev) and ev["gates"] == "passed"
    # the served answer resolves to this pipeline's training run
    pid = first.state["deploy"]["provenance_id"]
    from finetrace.serve.provenance import resolve

    assert resolve(ws, pid)["training_run"]["id"] == adapter.run_id
    assert first.paths["eval_report"].is_file()
    assert any(first.paths["documents"].rglob("*.html"))
    assert [e for e in ws.ledger.entries(type="approval")]

    # 2. nothing changed: every stage cached, no new stage runs in the ledger
    before = runs_by_kind(ws)
    second = run_pipeline(ws, path, progress=False, echo=lines.append)
    assert [s.status for s in second.stages] == ["cached"] * 7
    assert stage_status(ws, second.run_id) == {s: "cached" for s in stage_status(ws, first.run_id)}
    after = runs_by_kind(ws)
    assert after == {**before, "pipeline": before["pipeline"] + 1}
    assert second.state["adapter"] == first.state["adapter"]
    assert len([e for e in ws.ledger.entries(type="approval")]) == 1

    # 3. the dataset changed: data and everything downstream re-run; the base model stays cached
    write_rows(tmp_path / "train.csv", 42, 7)
    third = run_pipeline(ws, path, progress=False, echo=lines.append)
    status = stage_status(ws, third.run_id)
    assert status == {
        "model": "cached",
        "data": "ran",
        "train": "ran",
        "evaluate": "ran",
        "docs": "ran",
        "approve": "ran",
        "deploy": "ran",
    }
    assert ws.ledger.artifact(third.state["dataset"]).ref == "tickets@2"
    assert ws.ledger.artifact(third.state["adapter"]).ref == "routing-lora@2"
    assert runs_by_kind(ws) == {
        **after,
        "import": after["import"] + 1,
        "train": 2,
        "evaluate": 2,
        "document": 2,
        "deploy": 2,
        "parity": 2,
        "pipeline": 3,
    }
    # the cache key of the new train stage is recorded with it, next to the train run it made
    ev = [
        e.data
        for e in ws.ledger.entries(type="pipeline.stage")
        if e.data["run_id"] == third.run_id and e.data["stage"] == "train" and e.data["status"] == "ran"
    ][0]
    assert ev["cache_key"].startswith("sha256:") and ev["stage_runs"] == [
        ws.ledger.artifact(third.state["adapter"]).run_id
    ]

    from finetrace.ledger import verify_workspace

    assert verify_workspace(ws).ok


@pytest.mark.slow
def test_failed_gate_stops_the_pipeline(workspace, tiny_model_dir, tmp_path):
    ws = workspace
    gates = {
        "min_metric": {"accuracy": 1.0},
        "min_gain": {"accuracy": 1.0},
    }  # above 1 is refused: metrics are in [0, 1]
    path = make_pipeline(tmp_path, tiny_model_dir, gates=gates, deploy="record")
    with pytest.raises(GateFailedError) as err:
        run_pipeline(ws, path, progress=False, echo=lambda s: None)
    msg = str(err.value)
    assert "min_metric" in msg or "accuracy" in msg
    assert "report.html" in msg and "finetrace override" in msg
    res = err.value.pipeline_result
    assert [s.status for s in res.stages] == ["ran", "ran", "ran", "ran", "not reached", "not reached", "not reached"]
    assert ws.ledger.get_run(res.run_id).status == "failed"
    assert "document" not in runs_by_kind(ws) and "deploy" not in runs_by_kind(ws)
    # a re-run reuses the evaluation and stops again at the same gate, without retraining
    with pytest.raises(GateFailedError):
        run_pipeline(ws, path, progress=False, echo=lambda s: None)
    assert runs_by_kind(ws)["train"] == 1 and runs_by_kind(ws)["evaluate"] == 1


@pytest.mark.slow
def test_interrupted_training_resumes(workspace, tiny_model_dir, tmp_path, monkeypatch):
    """An interrupt during train leaves a `started` event; the next run calls train(resume=True)."""
    import finetrace.train as train_mod

    ws = workspace
    path = make_pipeline(tmp_path, tiny_model_dir, deploy="none")
    real = train_mod.train
    calls = []

    def interrupted(ws_, cfg, resume=False, progress=True):
        calls.append(resume)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(ws_, cfg, resume=resume, progress=progress)

    monkeypatch.setattr(train_mod, "train", interrupted)
    with pytest.raises(KeyboardInterrupt) as err:
        run_pipeline(ws, path, until="train", progress=False, echo=lambda s: None)
    assert err.value.pipeline_result.stage("train").status == "interrupted"
    assert ws.ledger.get_run(err.value.pipeline_result.run_id).status == "interrupted"
    res = run_pipeline(ws, path, until="train", progress=False, echo=lambda s: None)
    assert calls[:2] == [False, True]  # resumed; no checkpoint was written before the interrupt: afresh
    assert res.stage("train").status == "ran" and res.stage("evaluate").status == "not reached"


def test_config_errors_name_file_line_and_key(tmp_path, tiny_model_dir):
    path = make_pipeline(tmp_path, tiny_model_dir)
    text = path.read_text().replace("test_file:", "tset_file:")
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "tset_file" in ln)
    assert f"pipeline.yaml:{line}" in str(err.value) and "data.test_file" in str(err.value)

    path.write_text(text.replace("tset_file:", "test_file:").replace("max_steps:", "max_step:"))
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    assert "train.max_step" in str(err.value) and "train.max_steps" in str(err.value)


@pytest.mark.slow  # trains the tiny model (about 15 s)
def test_cli_run_json_shows_training_progress_on_stderr(workspace, tiny_model_dir, tmp_path, capsys):
    import json
    import re

    from finetrace.cli import main

    path = make_pipeline(tmp_path, tiny_model_dir)
    assert main(["--workspace", str(workspace.root), "run", str(path), "--until", "train", "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["stages"][2]["status"] == "ran"  # stdout: only the JSON
    # off a terminal, plain progress lines (the last update at least): step/total, loss and tokens/s
    lines = [ln for ln in out.err.splitlines() if re.match(r"train: \d+/\d+  loss \d+\.\d+.* tok/s", ln)]
    assert lines and lines[-1].split()[1].split("/")[0] == lines[-1].split()[1].split("/")[1]


def test_cli_run_json_and_errors(workspace, tiny_model_dir, tmp_path, capsys):
    import json

    from finetrace.cli import main

    path = make_pipeline(tmp_path, tiny_model_dir)
    assert main(["--workspace", str(workspace.root), "run", str(path), "--until", "data", "--json"]) == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert [s["status"] for s in doc["stages"]][:3] == ["ran", "ran", "not reached"]
    assert "data" in out.err and "stage" in out.err  # the summary table goes to stderr with --json
    assert main(["--workspace", str(workspace.root), "run", str(path), "--until", "nope"]) == 2
    assert "unknown stage 'nope'" in capsys.readouterr().err
    assert main(["--workspace", str(workspace.root), "run", str(tmp_path / "missing.yaml")]) == 2
    assert "no such pipeline file" in capsys.readouterr().err
