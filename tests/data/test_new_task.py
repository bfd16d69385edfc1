"""``finetrace new``: detection, sizing and gates of the written folder; its pipeline runs unedited."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from finetrace.cli import main
from finetrace.errors import ConfigError

from .dataset_files import write_jsonl

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_new_writes_a_sized_folder_and_says_what_it_found(tmp_path, capsys):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
                {"role": "tool", "content": "ok"},
                {"role": "assistant", "content": f"a{i}"},
            ]
        }
        for i in range(40)
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    code = main(["new", str(tmp_path / "support"), "--data", str(data), "--json"])
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["layout"], plan["schema"], plan["rows"]) == ("openai", "chat", 40)
    assert plan["steps"] == 10 and plan["group_gap_gate"] is False  # 1.5 * 32 / 8 = 6, at least 10
    folder = tmp_path / "support"
    assert sorted(p.name for p in folder.iterdir()) == [
        "chat.jsonl",
        "datasheet.yaml",
        "intended_use.yaml",
        "pipeline.yaml",
        "suite.yaml",
        "train.yaml",
    ]
    pipe = yaml.safe_load((folder / "pipeline.yaml").read_text())
    assert pipe["data"]["splits"] == [0.8, 0.1, 0.1] and "schema" not in pipe["data"]  # the format decides
    assert yaml.safe_load((folder / "train.yaml").read_text())["max_steps"] == 10
    assert yaml.safe_load((folder / "datasheet.yaml").read_text()) == {"title": "support"}  # the rest are gaps
    with pytest.raises(ConfigError, match="exists and is not empty"):
        from finetrace.data.newtask import new_task

        new_task(folder, data)


def test_steps_are_sized_on_the_rows_left_after_cleaning(workspace, tmp_path):
    """Duplicates, near-duplicates and invalid rows do not count towards the training split's size."""
    import math

    from finetrace.data import import_dataset
    from finetrace.data.newtask import new_task

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    rows = [
        {
            "prompt": f"case {i}: " + " ".join(words[(i * 7 + k) % len(words)] + str(i) for k in range(12)),
            "completion": f"answer {i}",
        }
        for i in range(240)
    ]
    rows += rows[:120]  # exact duplicates
    rows += [{"prompt": "", "completion": "x"}] * 40  # invalid (empty prompt)
    data = write_jsonl(tmp_path / "raw.jsonl", rows)
    plan = new_task(tmp_path / "t", data)
    art = import_dataset(workspace, [data], "raw", on_error="skip", splits=(0.8, 0.1, 0.1))
    train = art.metadata["counts"]["train"]
    assert plan["rows"] == 400 and plan["train_rows"] == train and 180 <= train <= 205
    assert plan["steps"] == math.ceil(1.5 * train / 8) < math.ceil(1.5 * 400 * 0.8 / 8)
    assert yaml.safe_load((tmp_path / "t" / "train.yaml").read_text())["max_steps"] == plan["steps"]


@pytest.mark.parametrize("task", ["clauses", "tickets"])
def test_group_gap_gate_only_with_groups_big_enough(tmp_path, task):
    from finetrace.data.newtask import new_task

    plan = new_task(tmp_path / task, EXAMPLES / task / "train.csv", EXAMPLES / task / "test.csv")
    assert plan["rows"] == {"clauses": 480, "tickets": 400}[task] and plan["schema"] == "classification"
    suite = yaml.safe_load((tmp_path / task / "suite.yaml").read_text())
    assert plan["group_gap_gate"] == ("max_group_gap" in suite["gates"])
    plan = new_task(
        tmp_path / f"{task}-small", EXAMPLES / task / "train.csv", EXAMPLES / task / "test.csv", eval_limit=12
    )
    assert plan["group_gap_gate"] is False


@pytest.mark.slow
@pytest.mark.parametrize("task", ["clauses", "tickets"])
def test_new_task_pipeline_runs_unedited_on_the_tiny_model(workspace, tiny_model_dir, tmp_path, task, capsys):
    from finetrace.pipeline import run_pipeline

    code = main(
        [
            "new",
            str(tmp_path / task),
            "--data",
            str(EXAMPLES / task / "train.csv"),
            "--test",
            str(EXAMPLES / task / "test.csv"),
            "--model",
            str(tiny_model_dir),
            "--max-steps",
            "4",
            "--eval-limit",
            "12",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "native layout, classification schema, " in out
    suite = yaml.safe_load((tmp_path / task / "suite.yaml").read_text())
    assert "max_group_gap" not in suite["gates"] and suite["limit"] == 12  # 12 examples: groups of ~4
    result = run_pipeline(workspace, tmp_path / task / "pipeline.yaml", progress=False, echo=lambda s: None)
    assert [s.status for s in result.stages] == ["ran"] * 5 + ["skipped", "ran"]  # approve: needs a person
    adapter = workspace.ledger.artifact(result.state["adapter"])
    assert adapter.ref == f"{task}-lora@1"
