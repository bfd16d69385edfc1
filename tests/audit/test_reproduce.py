"""Reproduce: a recorded train and evaluate run re-executed from the ledger alone, compared bit for bit."""

from __future__ import annotations

import pytest

from finetrace.audit import reproduce
from finetrace.audit.reproduction import compare_adapters
from finetrace.errors import InputError


def test_training_run_reproduces_bit_for_bit_on_cpu(audit_env):
    ws, g = audit_env
    adapter = ws.ledger.artifact(g["digests"]["adapter"])
    res = reproduce(ws, adapter.run_id)
    assert res.kind == "train" and res.original == adapter.digest and res.reproduced != adapter.digest
    assert res.bit_identical, res.files
    assert res.max_abs_diff == 0.0
    compared = {c.path for c in res.files}
    assert {"adapter_model.safetensors", "adapter_config.json", "metrics.jsonl", "finetrace_adapter.json"} <= compared
    new_run = ws.ledger.get_run(res.reproduced_run_id)
    old_run = ws.ledger.get_run(adapter.run_id)
    assert new_run.kind == "train" and new_run.inputs == old_run.inputs  # same inputs, by digest
    assert new_run.environment["torch_threads"] == old_run.environment["torch_threads"]
    assert new_run.environment["seed"] == old_run.environment["seed"]
    rec = ws.ledger.get_run(res.record_run_id)
    assert rec.kind == "reproduce" and rec.metrics["bit_identical"] is True and rec.metrics["max_abs_diff"] == 0.0
    assert rec.inputs == [adapter.digest, res.reproduced] and rec.config == {"run": adapter.run_id, "kind": "train"}


def test_a_different_training_is_reported_with_its_largest_difference(audit_env):
    """The comparison can fail: a run with another seed differs, and the largest difference is named."""
    from finetrace.train import TrainConfig, train

    ws, g = audit_env
    old = ws.ledger.get_run(ws.ledger.artifact(g["digests"]["adapter"]).run_id)
    cfg = {k: v for k, v in old.config.items() if k != "resolved"}
    other = train(ws, TrainConfig.model_validate({**cfg, "seed": 1, "output_name": "other-seed"}), progress=False)
    comps = {c.path: c for c in compare_adapters(ws, g["digests"]["adapter"], other.digest)}
    weights = comps["adapter_model.safetensors"]
    assert not weights.identical and weights.max_abs_diff > 0 and weights.note.startswith("largest difference in")


def test_evaluation_run_reproduces(audit_env):
    ws, g = audit_env
    report = ws.ledger.artifact(g["digests"]["report"])
    res = reproduce(ws, report.run_id)
    assert res.kind == "evaluate" and res.bit_identical and res.max_abs_diff == 0.0, res.files
    assert ws.ledger.artifact(res.reproduced).kind == "eval_report"


def test_runs_that_cannot_be_replayed_are_refused(audit_env):
    ws, g = audit_env
    convert = ws.ledger.artifact(g["digests"]["base"]).run_id
    with pytest.raises(InputError, match="reproduce replays train and evaluate runs"):
        reproduce(ws, convert)


@pytest.mark.slow
def test_cli_reproduce_reports_and_records(audit_env, capsys):
    import json

    from finetrace.cli import main

    ws, g = audit_env
    run_id = ws.ledger.artifact(g["digests"]["adapter"]).run_id
    assert main(["--workspace", str(ws.root), "reproduce", run_id[-6:]]) == 0  # a unique suffix is enough
    out = capsys.readouterr().out
    assert f"reproduced train run {run_id}" in out and "result: BIT-IDENTICAL" in out
    assert "adapter_model.safetensors" in out
    assert main(["--workspace", str(ws.root), "reproduce", run_id, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["bit_identical"] is True and res["max_abs_diff"] == 0.0
    assert len(ws.ledger.runs("reproduce")) == 2
    assert main(["--workspace", str(ws.root), "reproduce", "no-such-run"]) == 2
