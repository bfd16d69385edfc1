"""A corpus of broken inputs for every config file finetrace reads: train YAML, pipeline YAML, eval suite,
datasheet and intended-use files. Each is refused as an InputError that names the file and a line or
field and says what to do (a hint); no other exception escapes; through the CLI the workspace is unchanged.
"""

from __future__ import annotations

import gzip
import math

import pytest
import yaml

from finetrace.errors import InputError

TRAIN = {
    "base_model": "tiny",
    "dataset": "toy",
    "output_name": "toy-lora",
    "lr": 1e-3,
    "batch_size": 4,
    "betas": [0.9, 0.999],
    "lora": {"r": 8, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"]},
    "dpo": {"beta": 0.1},
}
PIPELINE = {
    "name": "corpus",
    "model": {"source": "tiny"},
    "data": {"name": "d", "files": ["train.csv"], "splits": [0.8, 0.1, 0.1], "seed": 0},
    "train": {"max_steps": 2, "lora": {"r": 4}},
    "evaluate": {"suite": "suite.yaml"},
    "docs": {"formats": ["md"]},
    "deploy": {"mode": "none", "max_tokens": 8},
}
SUITE = {
    "name": "s",
    "metrics": ["accuracy"],
    "max_new_tokens": 8,
    "bootstrap": {"samples": 50, "seed": 0},
    "bias": {"enabled": True, "categories": ["gender_names"], "max_examples": 3},
    "gates": {"min_metric": {"accuracy": 0.5}, "max_flip_rate": 0.1},
}
DATASHEET = {
    "source": "synthetic",
    "license": "CC0-1.0",
    "languages": ["en"],
    "personal_data": False,
    "collection_period": "2024",
}
INTENDED = {"intended_use": "Route tickets.", "limitations": "Toy data.", "license": "apache-2.0"}


def _train(p):
    from finetrace.train import load_config

    return load_config(p)


def _pipeline(p):
    from finetrace.pipeline import load_pipeline

    return load_pipeline(p)


def _suite(p):
    from finetrace.evaluate import load_suite

    return load_suite(p)


def _datasheet(p):
    from finetrace.data.datasheet import load_given

    return load_given(p)


def _intended(p):
    from finetrace.audit.facts import load_intended

    return load_intended(p)


KINDS = {
    "train": (TRAIN, _train),
    "pipeline": (PIPELINE, _pipeline),
    "suite": (SUITE, _suite),
    "datasheet": (DATASHEET, _datasheet),
    "intended_use": (INTENDED, _intended),
}
FACTS = ("datasheet", "intended_use")


def valid_text(kind: str) -> str:
    return yaml.safe_dump(KINDS[kind][0], sort_keys=False)


def first_key(kind: str) -> str:
    return next(iter(KINDS[kind][0]))


# (name, how to break the valid file, what the message says)
CORPUS = [
    ("latin-1", lambda k, t: (t + "# caf\xe9\n").encode("latin-1"), r"not UTF-8 text \(byte 0xe9\)"),
    ("utf-16 without BOM", lambda k, t: t.encode("utf-16-le"), "binary file"),
    ("utf-16 broken", lambda k, t: b"\xff\xfe" + t.encode("utf-16-le")[:-1], "not valid UTF-16"),
    ("control character", lambda k, t: t + "note: a\x1bb\n", "control character #x001b"),
    ("NUL inside", lambda k, t: t[:5] + "\x00" + t[5:], "binary file"),
    ("png", lambda k, t: b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "binary file"),
    ("gzip", lambda k, t: gzip.compress(t.encode()), "binary file|not UTF-8"),
    ("truncated flow list", lambda k, t: t + "extra: [a, b\n", "not valid YAML"),
    ("tab indentation", lambda k, t: t + "section:\n\tkey: 1\n", "not valid YAML"),
    ("unclosed quote", lambda k, t: t + 'extra: "abc\n', "not valid YAML"),
    ("duplicate key", lambda k, t: t + f"{first_key(k)}: again\n", "is written twice"),
    ("duplicate nested key", lambda k, t: t + "sect:\n  a: 1\n  a: 2\n", "'a' is written twice"),
    ("top-level list", lambda k, t: "- a\n- b\n", "mapping"),
    ("top-level text", lambda k, t: "just some words\n", "mapping"),
    ("deep nesting", lambda k, t: t + "deep: " + "[" * 400 + "]" * 400 + "\n", "nested more than"),
    (
        "deep block nesting",
        lambda k, t: t + "".join("  " * i + f"k{i}:\n" for i in range(60)) + "  " * 60 + "v: 1\n",
        "nested more than",
    ),
    (
        "alias bomb",
        lambda k, t: (
            t
            + "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
            + "".join(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 7))
        ),
        "expands to more than",
    ),
    ("oversized", lambda k, t: t + ("# padding " + "x" * 90 + "\n") * 50_000, "at most"),
    ("python tag", lambda k, t: t + "evil: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ("binary tag", lambda k, t: t + "blob: !!binary aGVsbG8=\n", "!!binary values are not allowed"),
    ("set tag", lambda k, t: t + "s: !!set {a, b}\n", "!!set values are not allowed"),
    ("unhashable key", lambda k, t: t + "? [a, b]\n: 1\n", "not valid YAML"),
    ("number as key", lambda k, t: t + "12: x\n", "12"),
]


def refused(kind: str, path) -> InputError:
    with pytest.raises(InputError) as err:
        KINDS[kind][1](path)
    e = err.value
    assert str(path) in str(e), f"{kind}: the file is not named: {e}"
    assert e.line is not None or e.field, f"{kind}: neither a line nor a field is named: {e}"
    assert e.hint, f"{kind}: no hint saying what to do: {e}"
    return e


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_valid_files_load(tmp_path, kind):
    p = tmp_path / f"{kind}.yaml"
    p.write_text(valid_text(kind))
    KINDS[kind][1](p)


@pytest.mark.parametrize("name,make,expect", CORPUS, ids=[c[0] for c in CORPUS])
@pytest.mark.parametrize("kind", list(KINDS))
def test_broken_file_is_refused_with_where_and_a_fix(tmp_path, kind, name, make, expect):
    import re

    data = make(kind, valid_text(kind))
    p = tmp_path / f"{kind}.yaml"
    p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    e = refused(kind, p)
    assert re.search(expect, str(e)), f"{kind}/{name}: {e}"


def leaves(doc: dict, prefix: str = ""):
    """Every dotted key path of a mapping, nested mappings included (a list is a leaf)."""
    for k, v in doc.items():
        path = prefix + k
        yield path, v
        if isinstance(v, dict):
            yield from leaves(v, path + ".")


def replaced(doc: dict, path: str, value):
    import copy

    out = copy.deepcopy(doc)
    cur = out
    parts = path.split(".")
    for p in parts[:-1]:
        cur = cur[p]
    cur[parts[-1]] = value
    return out


CONFIG_WRONG = [[["nested"]], {"k": "v"}, 10**30, math.inf, "not-a-valid-value!"]
FACT_WRONG = [[[["three"]]], {"a": {"b": {"c": 1}}}, math.nan, "x" * 200_001]


@pytest.mark.parametrize("kind", list(KINDS))
def test_wrong_types_at_every_level_name_the_field(tmp_path, kind):
    doc = KINDS[kind][0]
    checked = 0
    for path, good in leaves(doc):
        for wrong in FACT_WRONG if kind in FACTS else CONFIG_WRONG:
            if wrong == good or (isinstance(good, str) and isinstance(wrong, str)):
                continue  # text where text is expected may be valid (a name, a path)
            p = tmp_path / f"{kind}.yaml"
            p.write_text(yaml.safe_dump(replaced(doc, path, wrong), sort_keys=False))
            e = refused(kind, p)
            named = e.field or ""
            assert path in str(e) or named.startswith(path) or path.startswith(named.split(".")[0]) and named, (
                f"{kind}: {path} = {wrong!r:.40} gave {e}"
            )
            checked += 1
    assert checked >= 3 * len(list(leaves(doc)))


@pytest.mark.parametrize("kind", list(KINDS))
def test_cli_refuses_and_leaves_the_workspace_unchanged(workspace, tmp_path, capsys, kind):
    """Through the command that reads each file: one error line, exit 2, no ledger entry, no new file."""
    from finetrace.cli import main

    root = workspace.root

    def state():
        files = sorted(
            str(p.relative_to(root))
            for p in root.rglob("*")
            if not p.name.startswith("ledger.db") and "locks" not in p.parts
        )
        return workspace.ledger.size(), workspace.ledger.root(), files

    before = state()
    bad = tmp_path / f"bad-{kind}.yaml"
    bad.write_text(valid_text(kind) + f"{first_key(kind)}: twice\n")
    (tmp_path / "train.csv").write_text("prompt,completion\n" + "".join(f"q{i},a{i}\n" for i in range(12)))
    pipe = dict(PIPELINE, model={"source": "tiny"})
    if kind == "suite":
        pipe["evaluate"] = {"suite": str(bad)}
    if kind == "intended_use":
        pipe["docs"] = {"intended_use": str(bad)}
    if kind == "datasheet":
        pipe["data"] = dict(PIPELINE["data"], datasheet=str(bad))
    (tmp_path / "suite.yaml").write_text(valid_text("suite"))
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(pipe))
    args = {
        "train": ["train", str(bad)],
        "pipeline": ["run", str(bad)],
        "datasheet": ["data", "import", str(tmp_path / "train.csv"), "--name", "d", "--datasheet", str(bad)],
        "suite": ["run", str(pipeline)],
        "intended_use": ["run", str(pipeline)],
    }[kind]
    assert main(["-w", str(root), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "is written twice" in err and str(bad) in err
    assert state() == before
