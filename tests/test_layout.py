"""The test tree's layout: every folder holding tests is a package (see pyproject.toml's pytest section)."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).parent


def test_every_test_folder_is_a_package():
    folders = {p.parent for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(str(f.relative_to(TESTS.parent)) for f in folders if not (f / "__init__.py").is_file())
    assert missing == [], f"add an empty __init__.py to: {missing}"
