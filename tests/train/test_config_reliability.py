"""Train config reliability: every number bounded, duplicate keys refused, one-line errors (no tracebacks),
checkpoint folders finetrace does not own left alone, --resume after a kill at either end of a run, and
`finetrace train` naming the run it just made."""

from __future__ import annotations

import json

import pytest

from finetrace.errors import ConfigError
from finetrace.train import load_config, train
from finetrace.train.resume import ResumeWarning

from .train_support import make_config

MINIMAL = "base_model: tiny\ndataset: toy\noutput_name: toy-lora\n"


@pytest.mark.parametrize(
    "key,value",
    [
        ("max_grad_norm", "-1"),
        ("max_grad_norm", "0"),
        ("max_grad_norm", ".inf"),
        ("batch_size", "1.0e+23"),
        ("batch_size", "100000000000000000000000"),
        ("batch_size", "true"),
        ("warmup_steps", "10000000000000"),
        ("warmup_steps", "-1"),
        ("threads", "100000"),
        ("threads", "0"),
        ("lr", "1e400"),
        ("lr", ".nan"),
        ("lr", "-1.0e-4"),
        ("lr", "5.0"),
        ("lr", "true"),
        ("seed", str(2**64)),
        ("seed", str(2**70)),
        ("seed", "-1"),
        ("epochs", "1.0e+9"),
        ("max_steps", "10000000000000"),
        ("grad_accum", "10000000000"),
        ("max_length", "10000000000000"),
        ("eps", "0"),
        ("weight_decay", "1.0e+9"),
        ("betas", "[0.9, 1.5]"),
        ("keep_checkpoints", "100000000"),
        ("assumed_watts", "1.0e+300"),
        ("eval_every", "0"),
        ("lora.r", "100000000"),
        ("lora.alpha", "1.0e+30"),
        ("lora.dropout", "1.0"),
        ("dpo.beta", "1.0e+9"),
        ("lora.target_modules", "[[q_proj], v_proj]"),
        ("lora.target_modules", "[]"),
        ("lora.target_modules", "['q_proj; rm -rf /']"),
        ("lora.target_modules", "7"),
        ("split", "../../etc/passwd"),
        ("validation_split", "a/b"),
        ("checkpoint_dir", "''"),
    ],
)
def test_every_numeric_key_is_bounded_both_ways(tmp_path, key, value):
    f = tmp_path / "c.yaml"
    section, _, leaf = key.rpartition(".")
    f.write_text(MINIMAL + (f"{section}:\n  {leaf}: {value}\n" if section else f"{key}: {value}\n"))
    with pytest.raises(ConfigError) as err:
        load_config(f)
    line = 5 if section else 4
    assert f"c.yaml:{line} field '{key}'" in str(err.value), str(err.value)
    with pytest.raises(ConfigError, match=f"field '{key}'"):  # the same through --set
        load_config(None, ["base_model=t", "dataset=d", "output_name=o", f"{key}={value}"])


def test_values_at_the_bounds_are_accepted(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        MINIMAL + f"seed: {2**64 - 1}\nmax_grad_norm: 1.0e-6\nlr: 1.0\nthreads: 1\nwarmup_steps: 0\n"
        "betas: [0.0, 0.999]\nlora:\n  target_modules: [q_proj, model.layers.0.mlp.up_proj]\n"
    )
    cfg = load_config(f)
    assert (cfg.seed, cfg.max_grad_norm, cfg.lr) == (2**64 - 1, 1e-6, 1.0)


@pytest.mark.parametrize(
    "text,key,first,second",
    [
        (MINIMAL + "lr: 1.0e-3\nbatch_size: 2\nlr: 5.0\n", "lr", 4, 6),
        (MINIMAL + "lora:\n  r: 8\n  alpha: 16\n  r: 64\n", "r", 5, 7),
        ("base_model: a\nbase_model: b\ndataset: toy\noutput_name: o\n", "base_model", 1, 2),
    ],
)
def test_duplicate_keys_are_refused_naming_both_lines(tmp_path, text, key, first, second):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert f"c.yaml:{second}: key '{key}' is written twice (first at line {first})" in str(err.value)


def test_merge_keys_are_not_duplicates(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(MINIMAL + "lora:\n  <<: {r: 4, alpha: 8}\n  r: 16\n")
    assert load_config(f).lora.r == 16  # an explicit key over a merged one is YAML's documented override


@pytest.mark.parametrize(
    "content,expect",
    [
        ("lr: 1e400\n", "field 'lr': Input should be a finite number"),
        (f"seed: {2**70}\n", "field 'seed'"),
        ("lora:\n  target_modules: [[q_proj], k_proj]\n", "field 'lora.target_modules'"),
        ("lora: " + "[" * 3000 + "]" * 3000 + "\n", "nested"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "is a binary file"),
        (b"lr: 1.0e-3\nnote: caf\xe9\n", "not UTF-8 text (byte 0xe9)"),
        ("output_name: a\x07b\n", "control character #x0007"),
    ],
)
def test_bad_files_are_one_line_errors_not_tracebacks(tmp_path, capsys, content, expect):
    from finetrace.cli import main

    f = tmp_path / "c.yaml"
    if isinstance(content, bytes):
        f.write_bytes(content)
    else:
        f.write_text(MINIMAL + content)
    assert main(["train", str(f), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert expect in err and err.startswith(f"error: {f}") and err.count("\n") == 1, err


@pytest.mark.slow  # trains the tiny model (a few seconds; more on a loaded machine)
def test_user_checkpoint_dir_is_never_emptied(tiny_setup, tmp_path):
    ws, _, _ = tiny_setup
    mine = tmp_path / "my-project"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / "step-00000001").mkdir()  # even a name like ours: not finetrace's
    art = train(
        ws, make_config(max_steps=3, checkpoint_every=1, checkpoint_dir=str(mine), compile=False), progress=False
    )
    assert art.kind == "adapter"
    assert sorted(p.name for p in mine.iterdir()) == ["step-00000001", "thesis.tex"]  # ours made and removed
    assert (mine / "thesis.tex").read_text() == "years of work"

    foreign = mine / "finetrace-train"  # our subfolder name, but holding something we did not write
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    runs = len(ws.ledger.runs("train"))
    with pytest.raises(ConfigError, match="finetrace-train already holds files finetrace did not write"):
        train(
            ws,
            make_config(max_steps=3, checkpoint_every=1, checkpoint_dir=str(mine), compile=False, seed=1),
            progress=False,
        )
    assert (foreign / "notes.txt").read_text() == "keep" and len(ws.ledger.runs("train")) == runs


@pytest.mark.slow  # trains the tiny model (a few seconds; more on a loaded machine)
def test_resume_without_any_checkpoint_starts_fresh_and_says_so(tiny_setup):
    ws, _, _ = tiny_setup
    cfg = make_config(compile=False, max_steps=3)
    with pytest.warns(ResumeWarning, match="no complete checkpoint .* starting fresh"):
        art = train(ws, cfg, resume=True, progress=False)
    run = ws.ledger.get_run(art.run_id)
    assert run.status == "succeeded" and run.metrics["steps"] == 3 and run.metrics["resumed_from_step"] is None


@pytest.mark.slow  # trains the tiny model (a few seconds; more on a loaded machine)
def test_resume_after_the_run_was_recorded_recognises_the_adapter(tiny_setup):
    ws, _, _ = tiny_setup
    cfg = make_config(compile=False, max_steps=3, checkpoint_every=1)
    art = train(ws, cfg, progress=False)
    runs = [r.id for r in ws.ledger.runs("train")]
    with pytest.warns(ResumeWarning, match=f"run {art.run_id} of this config already recorded adapter toy-lora@1"):
        again = train(ws, cfg.model_copy(update={"log_every": 2}), resume=True, progress=False)  # cadence key
    assert again.digest == art.digest and [r.id for r in ws.ledger.runs("train")] == runs  # nothing retrained
    with pytest.warns(ResumeWarning, match="starting fresh"):  # another config: not that adapter
        other = train(ws, cfg.model_copy(update={"seed": 9}), resume=True, progress=False)
    assert other.digest != art.digest


@pytest.mark.slow  # trains the tiny model (a few seconds; more on a loaded machine)
def test_cli_train_prints_the_run_it_just_made(tiny_setup, tmp_path, capsys):
    from finetrace.cli import main

    ws, _, _ = tiny_setup
    f = tmp_path / "t.yaml"
    f.write_text(MINIMAL + "batch_size: 4\nmax_steps: 2\ncompile: false\ncheckpoint_every: null\n")
    made = []
    for _ in range(2):  # the same config twice: the same bytes, two runs
        assert main(["-w", str(ws.root), "train", str(f), "--json"]) == 0
        made.append(json.loads(capsys.readouterr().out))
    runs = [r.id for r in ws.ledger.runs("train")]
    assert made[0]["artifact"]["digest"] == made[1]["artifact"]["digest"]
    assert [m["run"] for m in made] == runs and runs[0] != runs[1]
    assert main(["-w", str(ws.root), "train", str(f), "--resume"]) == 0
    out = capsys.readouterr()
    assert f"note: nothing to resume: run {runs[1]}" in out.err and f"run {runs[1]}" in out.out


@pytest.mark.parametrize(
    "body,key", [("output_name: -lora\n", "output_name"), ("output_name: a/../b\n", "output_name")]
)
def test_a_bad_name_names_the_file_line_and_key(tmp_path, body, key):
    from finetrace.pipeline.config import parse_pipeline

    f = tmp_path / "c.yaml"
    f.write_text("base_model: tiny\ndataset: toy\n" + body)
    with pytest.raises(ConfigError, match=rf"c.yaml:3 field '{key}': .*bad name"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"p.yaml:1 field 'name': .*bad name"):
        parse_pipeline(
            {"name": "-x", "model": {"source": "m"}, "data": {"name": "d", "files": ["f"]}},
            file="p.yaml",
            lines={"name": 1},
        )
