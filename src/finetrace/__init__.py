"""finetrace: from a domain dataset to a deployed, auditable LoRA-specialised model.

Everything finetrace makes is an artifact named by its SHA-256 digest; everything it does is a run
recorded in a tamper-evident ledger (see ``finetrace.ledger``).
"""

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it); see CHANGELOG.md
