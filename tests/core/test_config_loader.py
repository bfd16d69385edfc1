"""One loader for every typed YAML config (yamlfile.validate_model): the same error format everywhere."""

from __future__ import annotations

import re

import pytest
import yaml

from finetrace.errors import ConfigError

PIPE = {"name": "p", "model": {"source": "tiny"}, "data": {"name": "d", "files": ["t.csv"]}}


def _err(load, path) -> str:
    with pytest.raises(ConfigError) as e:
        load(path)
    return str(e.value)


def _cases(tmp_path):
    from finetrace.evaluate import load_suite
    from finetrace.pipeline import load_pipeline
    from finetrace.train import load_config

    def write(name, doc):
        p = tmp_path / name
        p.write_text(yaml.safe_dump(doc, sort_keys=False))
        return p

    train = {"base_model": "b", "dataset": "d", "output_name": "o", "batchsize": 2}
    tfile = write("train.yaml", {"lr": 0.001, "lora": {"rnk": 4}})
    return [
        (load_config, write("t.yaml", train), "t.yaml", "batchsize", "batch_size"),
        (load_pipeline, write("p1.yaml", {**PIPE, "evalute": {}}), "p1.yaml", "evalute", "evaluate"),
        (
            load_pipeline,
            write("p2.yaml", {**PIPE, "train": {"learning_rate": 1}}),
            "p2.yaml",
            "train.learning_rate",
            "train.lr",
        ),
        (
            load_pipeline,
            write("p3.yaml", {**PIPE, "train": {"config": str(tfile)}}),
            "train.yaml",
            "lora.rnk",
            "train.lora.r",
        ),
        (
            load_suite,
            write("s.yaml", {"name": "s", "gates": {"max_flip_rte": 0.1}}),
            "s.yaml",
            "gates.max_flip_rte",
            "gates.max_flip_rate",
        ),
        (
            load_pipeline,
            write("p4.yaml", {**PIPE, "evaluate": {"suite": {"metrics": ["accuracy"], "bais": {}}}}),
            "p4.yaml",
            "evaluate.suite.bais",
            "evaluate.suite.bias",
        ),
    ]


def _line_of(path, leaf: str) -> int:
    return next(i for i, t in enumerate(path.read_text().splitlines(), 1) if t.strip().startswith(leaf + ":"))


def test_unknown_keys_read_the_same_from_every_config(tmp_path):
    for load, path, file, key, close in _cases(tmp_path):
        msg = _err(load, path)
        line = _line_of(path.parent / file, key.rsplit(".", 1)[-1])
        want = f"{file}:{line} field '{key}': unknown key (did you mean '{close}'?)"
        assert msg.endswith(want), (msg, want)


def test_bad_values_and_missing_keys_read_the_same(tmp_path):
    from finetrace.evaluate import load_suite
    from finetrace.train import load_config

    t = tmp_path / "t.yaml"
    t.write_text("base_model: b\ndataset: d\noutput_name: o\nlr: -1\n")
    s = tmp_path / "s.yaml"
    s.write_text("name: s\nmax_new_tokens: 0\n")
    for load, p, line, key in ((load_config, t, 4, "lr"), (load_suite, s, 2, "max_new_tokens")):
        assert re.search(
            rf"{p.name}:{line} field '{key}': Input should be greater than [^(]*\(got -?\d+\) \(.+\)$", _err(load, p)
        )
    t.write_text("base_model: b\ndataset: d\n")
    assert _err(load_config, t).endswith(
        "t.yaml field 'output_name': required key is missing (add "
        "'output_name: ...' (Name of the adapter artifact written (versions "
        "are numbered).))"
    )
    for load, p in ((load_config, t), (load_suite, s)):
        p.write_text("- a\n")
        assert f"{p.name}:1: the " in _err(load, p) and "must be a mapping of key: value, not a list" in _err(load, p)
