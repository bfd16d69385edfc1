"""A pipeline checks every file it names before its first stage runs; its YAML refuses duplicate keys."""

from __future__ import annotations

import pytest

from finetrace.errors import ConfigError, InputError
from finetrace.pipeline import load_pipeline, run_pipeline

from .test_pipeline import make_pipeline


@pytest.mark.parametrize(
    "target,edit,match",
    [
        ("suite.yaml", None, r"field 'evaluate.suite': no such file"),
        ("intended_use.yaml", None, r"field 'docs.intended_use': no such file"),
        ("datasheet.yaml", None, r"field 'data.datasheet': no such file"),
        ("test.csv", None, r"field 'data.test_file': no such file"),
        (
            "suite.yaml",
            "max_new_tokens: 64\nmax_new_tokens: 1\n",
            r"suite.yaml:2: key 'max_new_tokens' is written twice",
        ),
        ("suite.yaml", "gates:\n  max_flip_rate: .nan\n", r"suite.yaml:2.*gates.max_flip_rate"),
        ("intended_use.yaml", "intended_use: x\nlimits: y\n", r"unknown intended-use key 'limits'"),
        ("intended_use.yaml", b"\xff\xfe\x00\xd8", r"intended_use.yaml:1: the intended-use file is not valid UTF-16"),
        ("datasheet.yaml", "source: a\nsource: b\n", r"datasheet.yaml:2: key 'source' is written twice"),
    ],
)
def test_a_bad_named_file_fails_before_any_stage(workspace, tiny_model_dir, tmp_path, target, edit, match):
    path = make_pipeline(tmp_path, tiny_model_dir, deploy="none")
    if edit is None:
        (tmp_path / target).unlink()
    elif isinstance(edit, bytes):
        (tmp_path / target).write_bytes(edit)
    else:
        (tmp_path / target).write_text(edit)
    size = workspace.ledger.size()
    with pytest.raises(InputError, match=match):
        run_pipeline(workspace, path, progress=False, echo=lambda s: None)
    assert workspace.ledger.size() == size and workspace.ledger.runs() == []  # nothing ran, nothing recorded


def test_duplicate_keys_in_a_pipeline_and_its_train_config(tmp_path, tiny_model_dir):
    path = make_pipeline(tmp_path, tiny_model_dir)
    text = path.read_text()
    path.write_text(text.replace("  max_steps: 2\n", "  max_steps: 2\n  lr: 5.0\n", 1))
    with pytest.raises(ConfigError, match=r"pipeline.yaml:\d+: key 'lr' is written twice \(first at line \d+\)"):
        load_pipeline(path)
    (tmp_path / "train.yaml").write_text("lr: 1.0e-3\nlr: 5.0\n")
    path.write_text(text.replace("train:\n", "train:\n  config: train.yaml\n", 1))
    with pytest.raises(ConfigError, match=r"train.yaml:2: key 'lr' is written twice \(first at line 1\)"):
        load_pipeline(path)
    (tmp_path / "train.yaml").write_text("max_grad_norm: -1\n")
    with pytest.raises(ConfigError, match=r"train.yaml:1 field 'max_grad_norm'"):
        load_pipeline(path)
