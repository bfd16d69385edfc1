"""Docs kept honest: the generated config reference is current, every command is documented, every
shipped example config parses."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p.parent for p in (ROOT / "examples").glob("*/pipeline.yaml"))


def commands() -> list[str]:
    import typer

    from finetrace.cli import app

    out = []

    def walk(cmd, prefix):
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            if getattr(sub, "commands", None):
                walk(sub, prefix + [name])
            else:
                out.append(" ".join(prefix + [name]))

    walk(typer.main.get_command(app), [])
    return out


@pytest.mark.slow
def test_config_reference_is_up_to_date(capsys):
    # the script's own check, run in this process (the config models are imported here already; a fresh
    # interpreter cost ~5 s of imports)
    spec = importlib.util.spec_from_file_location("_gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--check"]) == 0, capsys.readouterr().err


def test_every_command_is_documented():
    text = "\n".join(p.read_text("utf-8") for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    cmds = commands()
    assert "run" in cmds and "data import" in cmds
    missing = [c for c in cmds if not re.search(rf"finetrace {re.escape(c)}(\s|$|`)", text)]
    assert not missing, f"commands not shown in README.md or docs/*.md: {missing}"


def test_every_stage_has_a_page():
    for page in (
        "pipeline",
        "models",
        "data",
        "train",
        "evaluate",
        "audit",
        "serve",
        "market",
        "ledger",
        "config-reference",
    ):
        assert (ROOT / "docs" / f"{page}.md").is_file(), page


@pytest.mark.parametrize("task", EXAMPLES, ids=lambda p: p.name)
def test_shipped_examples_parse(task):
    from finetrace.evaluate import load_suite
    from finetrace.pipeline import load_pipeline

    cfg = load_pipeline(task / "pipeline.yaml")  # also validates the train keys
    assert cfg.path(cfg.data.files[0]).is_file() and cfg.path(cfg.data.test_file).is_file()
    suite = load_suite(cfg.path(cfg.evaluate.suite))
    assert not suite.gates.empty()
    for key in ("datasheet",):
        assert cfg.path(getattr(cfg.data, key)).is_file()
    assert cfg.path(cfg.docs.intended_use).is_file()


def test_example_datasets_are_generated_by_the_script(tmp_path):
    """make_datasets.py is deterministic and the shipped CSVs are what it writes."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import make_datasets
    finally:
        sys.path.pop(0)
    make_datasets.main(tmp_path)
    for task in EXAMPLES:
        for f in ("train.csv", "test.csv"):
            assert (tmp_path / task.name / f).read_bytes() == (task / f).read_bytes(), f"{task.name}/{f}"
