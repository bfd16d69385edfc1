"""The marketplace's face of the chat-template and tokenizer check (``finetrace.models.template_check``,
one rule below both the marketplace and serving): the same functions, refusing with ``Refused``.

Used by ``market import-hub`` and ``market pull`` (``--allow-template-change``).
"""

from __future__ import annotations

from ..models import template_check as _rule
from ..models.template_check import (  # noqa: F401  (re-exported)
    TOKENIZER_FILES,
    chat_template,
    compare_files,
    compare_identity,
    unified,
)
from .checks import Refused


def check(differences: list[dict], what: str, allow: bool = False) -> list[dict]:
    """Refuse ``what`` (``Refused``) when it has differences, showing each, unless ``allow``; returns them."""
    return _rule.check(differences, what, allow, error=Refused)
