"""``--from-hub ID[@revision]``: a dataset repository on the Hugging Face Hub, as local data files.

``resolve(spec)`` downloads (or, offline, finds in the local hub cache) the repository's snapshot with
``huggingface_hub.snapshot_download`` and returns its data files by split, with the commit the
revision resolved to, which the import records (so ``org/name@main`` today and tomorrow are told
apart). Split by file name, as the Hub's own viewer does: a path holding ``test`` is the held-out
test file, the others (``train``, ``validation``/``dev``, or unnamed) are the data to split.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ConfigError, NotFoundError
from .readers import COMPRESSED_SUFFIXES, EXTENSIONS

_REPO = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def _is_data(path: Path) -> bool:
    name = path.name.lower()
    for suf in COMPRESSED_SUFFIXES:
        name = name.removesuffix(suf)
    return "." + name.rsplit(".", 1)[-1] in EXTENSIONS and not name.startswith(".")


def resolve(spec: str) -> tuple[list[Path], Path | None, dict]:
    """``ID[@revision]`` -> (data files, test file or None, {"id", "revision", "commit"})."""
    repo_id, _, revision = spec.partition("@")
    if not _REPO.match(repo_id):
        raise ConfigError(
            f"bad --from-hub {spec!r}",
            field="--from-hub",
            hint="write ORG/NAME or ORG/NAME@REVISION (a branch, tag or commit)",
        )
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise NotFoundError("--from-hub needs huggingface_hub", hint="pip install huggingface_hub") from None
    cache = os.environ.get("HF_HUB_CACHE") or (os.environ.get("HF_HOME") and str(Path(os.environ["HF_HOME"]) / "hub"))
    try:
        folder = Path(
            snapshot_download(repo_id, repo_type="dataset", revision=revision or None, cache_dir=cache or None)
        )
    except LocalEntryNotFoundError:
        raise NotFoundError(
            f"the Hub dataset {spec} is not in the local cache and the Hub cannot be reached (offline)",
            hint="download it once with network access (huggingface-cli download "
            f"--repo-type dataset {repo_id}), or unset HF_HUB_OFFLINE",
        ) from None
    except (HfHubHTTPError, ValueError, OSError) as exc:
        raise NotFoundError(
            f"cannot fetch the Hub dataset {spec}: {exc}",
            hint="check the id and revision (a branch, tag or 40-hex commit)",
        ) from None
    commit = folder.name if _COMMIT.match(folder.name) else None
    files = sorted(p for p in folder.rglob("*") if p.is_file() and _is_data(p))
    if not files:
        raise NotFoundError(
            f"the Hub dataset {spec} holds no data files (.parquet, .jsonl, .json, .csv, .tsv)",
            hint="a dataset built by a loading script cannot be imported: export it to files",
        )
    tests = [p for p in files if "test" in p.relative_to(folder).as_posix().lower()]
    data = [p for p in files if p not in tests]
    if not data:
        data, tests = tests, []
    if len(tests) > 1:  # one held-out file only: the rest of the test shards are refused, not dropped
        raise ConfigError(
            f"the Hub dataset {spec} has {len(tests)} test files",
            hint="import them with --test-file after merging, or give the data files explicitly",
        )
    return data, (tests[0] if tests else None), {"id": repo_id, "revision": revision or "main", "commit": commit}
