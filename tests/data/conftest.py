"""Data-stage test fixtures (helpers live in ``dataset_files.py``)."""

from __future__ import annotations

import pytest

from .dataset_files import completion_rows


@pytest.fixture
def rows30():
    return completion_rows(30)
