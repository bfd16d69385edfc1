"""Fetching a model folder from the Hugging Face Hub by id (``org/name``), where the network allows.

Only safetensors weights, JSON configs and tokenizer files are downloaded (``ALLOW``), never pickle
weights or code. The snapshot's commit hash is returned so the ledger pins exactly what was fetched.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import DependencyError, NotFoundError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
ALLOW = ["*.safetensors", "*.json", "tokenizer.model", "merges.txt", "vocab.txt", "*.jinja", "*.tiktoken"]


def looks_like_hub_id(text: str) -> bool:
    return bool(HUB_ID.match(text)) and ".." not in text


def fetch(repo_id: str, cache: Path, revision: str | None = None) -> tuple[Path, str]:
    """Download ``repo_id`` (allowed files only) into ``cache``; return the snapshot folder and commit."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise DependencyError(
            "huggingface_hub is needed to fetch models by hub id", hint="pip install huggingface_hub"
        ) from exc
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW, cache_dir=str(cache)))
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
        raise NotFoundError(
            f"the Hugging Face Hub has no accessible model {repo_id!r}"
            + (f" at revision {revision!r}" if revision else ""),
            hint=f"check the id, or log in for gated models ({type(exc).__name__})",
        ) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as exc:
        # OSError covers connection errors (requests/httpx raise subclasses of it)
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        raise DependencyError(
            f"cannot fetch {repo_id!r} from the Hugging Face Hub: it is not reachable "
            f"from here and not in the cache {cache} ({type(exc).__name__})",
            hint="HF_HUB_OFFLINE is set; unset it where the network allows"
            if offline
            else "on a machine without network access add a local folder or GGUF file instead",
        ) from None
    except Exception as exc:  # any other transport failure of the download, named for the user
        raise DependencyError(
            f"cannot fetch {repo_id!r} from the Hugging Face Hub: {type(exc).__name__}: {exc}".splitlines()[0]
        ) from exc
    return path, path.name
