"""The marketplace: a registry server for domain adapters with their evidence, and its client.

    server side:  Registry(Settings) (registry.py), create_app(settings) (server.py), pages (web.py)
    checks:       checks.py (files by content, strict safetensors, tensors vs base shapes, caps)
    package:      package.py (the signed manifest, DSSE attestation, verification shared by both sides)
    storage:      db.py (SQLAlchemy models, named migrations, full-text index)
    client:       client.py (build_package, publish, search, pull)

Entry points: ``finetrace market serve|add-user|add-base|publish|search|pull``.
"""

from .checks import REQUIRED_DOCUMENTS, Limits, Refused


def __getattr__(name: str):
    # the registry (SQLAlchemy) loads only when asked for: a client publish or pull does not need it
    if name in ("Registry", "Settings"):
        from . import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["REQUIRED_DOCUMENTS", "Limits", "Refused", "Registry", "Settings"]
