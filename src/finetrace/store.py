"""Content-addressed object store: ``objects/sha256/ab/cdef…``.

A file is stored under the SHA-256 of its bytes. A folder (an adapter, a model) is stored as its files
plus a *manifest*, canonical JSON listing every relative path with its size and digest; the folder's
digest is the digest of that manifest. Storing the same content twice is a no-op (dedup).

Every write is atomic (temp file in ``objects/tmp``, fsync, rename, fsync folder), so a process killed
midway leaves nothing under a digest name. Every object is re-hashed when it enters the store and again
when it is read for use (``verify``, ``file``, ``materialize``); a mismatch is an ``IntegrityError``
naming the object.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .atomic import fsync_dir
from .canonical import CHUNK, canonical_json, check_digest, sha256_bytes, sha256_file
from .debris import scratch_prefix
from .errors import InputError, IntegrityError, NotFoundError

TREE_FORMAT = "finetrace-tree/1"


def tree_bytes(entries: list[dict]) -> bytes:
    """The folder manifest: canonical JSON of ``{"format", "files": [{"path", "size", "digest"}]}``
    sorted by path. Its SHA-256 is the folder's digest: the one folder-digest rule (stored ledgers
    name adapters, models and datasets by it, so it never changes)."""
    files = sorted(entries, key=lambda e: e["path"])
    return canonical_json({"format": TREE_FORMAT, "files": files})


def tree_digest(files: dict[str, bytes]) -> str:
    """The folder digest of ``{relative path: bytes}`` held in memory (what ``put_dir`` would return)."""
    return sha256_bytes(tree_bytes([{"path": p, "size": len(b), "digest": sha256_bytes(b)} for p, b in files.items()]))


def folder_digest(folder: str | Path) -> str:
    """The folder digest of a folder on disk, without storing it (what ``put_dir`` would return)."""
    folder = Path(folder)
    entries = [
        {"path": f.relative_to(folder).as_posix(), "size": f.stat().st_size, "digest": sha256_file(f)}
        for f in sorted(q for q in folder.rglob("*") if q.is_file())
    ]
    return sha256_bytes(tree_bytes(entries))


@dataclass(frozen=True)
class TreeEntry:
    path: str
    size: int
    digest: str


class ObjectStore:
    """Objects under ``root`` (``<workspace>/objects``); ``cache`` holds materialised folders."""

    def __init__(self, root: str | Path, cache: str | Path | None = None):
        self.root = Path(root)
        self.cache = Path(cache) if cache else self.root.parent / "cache" / "trees"
        self.tmp = self.root / "tmp"

    # -- paths -------------------------------------------------------------------------------
    def path(self, digest: str) -> Path:
        hexd = check_digest(digest).split(":", 1)[1]
        return self.root / "sha256" / hexd[:2] / hexd[2:]

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def __iter__(self) -> Iterator[str]:
        base = self.root / "sha256"
        if not base.is_dir():
            return
        for sub in sorted(base.iterdir()):
            for f in sorted(sub.iterdir()):
                if not f.name.startswith("."):
                    yield f"sha256:{sub.name}{f.name}"

    # -- writing -----------------------------------------------------------------------------
    def put_bytes(self, data: bytes) -> str:
        digest = sha256_bytes(data)
        if not self.has(digest):
            self._commit(digest, lambda fh: fh.write(data))
        return digest

    def put_file(self, src: str | Path) -> str:
        """Copy ``src`` into the store (hashing while copying) and return its digest."""
        return self.place(*self.stage_file(src))

    def stage_file(self, src: str | Path) -> tuple[str, str]:
        """Copy ``src`` to a temp file inside the store, hashing while copying (fsynced): ``(temp path,
        digest)``. Nothing is stored under a digest until ``place(temp, digest)``; a caller that decides
        not to store it calls ``discard(temp)`` (a temp left by a killed process is debris)."""
        src = Path(src)
        if not src.exists() or src.is_dir():  # a pipe or device streams in fine
            raise NotFoundError(f"no such file: {src}")
        self.tmp.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix=scratch_prefix(self.root.parent), suffix=".part")
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                while chunk := inp.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            self.discard(tmp)
            raise
        return tmp, "sha256:" + h.hexdigest()

    def place(self, tmp: str, digest: str) -> str:
        """Store a temp file from ``stage_file`` under its digest; return the digest."""
        try:
            self._place(tmp, digest)
            return digest
        finally:
            self.discard(tmp)

    @staticmethod
    def discard(tmp: str) -> None:
        if os.path.exists(tmp):
            os.unlink(tmp)

    def put_dir(self, src: str | Path) -> str:
        """Store every regular file under ``src`` and a manifest; return the manifest's digest."""
        src = Path(src)
        if not src.is_dir():
            raise NotFoundError(f"no such folder: {src}")
        entries = []
        for f in sorted(p for p in src.rglob("*") if p.is_file() or p.is_symlink()):
            if f.is_symlink():
                raise InputError(f"symbolic links are not stored: {f}", hint="copy the file it points to")
            rel = f.relative_to(src).as_posix()
            digest = self.put_file(f)
            entries.append({"path": rel, "size": f.stat().st_size, "digest": digest})
        return self.put_bytes(self.manifest_bytes(entries))

    @staticmethod
    def manifest_bytes(entries: list[dict]) -> bytes:
        return tree_bytes(entries)

    def _commit(self, digest: str, write) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix=scratch_prefix(self.root.parent), suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)
                out.flush()
                os.fsync(out.fileno())
            self._place(tmp, digest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _place(self, tmp: str, digest: str) -> None:
        dest = self.path(digest)
        if dest.exists():
            return  # dedup: same name, same bytes
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o444)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)

    # -- reading -----------------------------------------------------------------------------
    def verify(self, digest: str) -> None:
        """Re-hash the object; raise IntegrityError naming it if its bytes changed."""
        p = self.path(digest)
        if not p.is_file():
            raise IntegrityError(f"object {digest} is missing from {self.root}")
        actual = sha256_file(p)
        if actual != digest:
            raise IntegrityError(f"object {digest} is corrupt: its content hashes to {actual}", hint=f"file {p}")

    def read_bytes(self, digest: str) -> bytes:
        p = self.path(digest)
        if not p.is_file():
            raise NotFoundError(f"object {digest} is not in the store")
        data = p.read_bytes()
        if sha256_bytes(data) != digest:
            raise IntegrityError(f"object {digest} is corrupt", hint=f"file {p}")
        return data

    def file(self, digest: str) -> Path:
        """Path of a verified file object (re-hashed now)."""
        self.verify(digest)
        return self.path(digest)

    def is_tree(self, digest: str) -> bool:
        """True if the object is a folder manifest (checked by content, never by name)."""
        p = self.path(digest)
        if not p.is_file() or p.stat().st_size > 64 << 20:
            return False
        data = p.read_bytes()
        return data.startswith(b'{"files":[') and data.endswith(b'"format":"' + TREE_FORMAT.encode() + b'"}')

    def tree(self, digest: str) -> list[TreeEntry]:
        """The verified manifest of a folder object."""
        import json

        doc = json.loads(self.read_bytes(digest))
        if doc.get("format") != TREE_FORMAT:
            raise IntegrityError(f"object {digest} is not a folder manifest")
        out = []
        for e in doc["files"]:
            rel = PurePosixPath(e["path"])
            if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                raise IntegrityError(f"folder {digest} holds an unsafe path {e['path']!r}")
            out.append(TreeEntry(e["path"], int(e["size"]), e["digest"]))
        return out

    def materialize(self, digest: str, dest: str | Path | None = None) -> Path:
        """A folder with the tree's files, every file re-hashed now. Cached under ``cache/``.

        Files are hard links to the read-only objects where the filesystem allows, else copies.
        The folder appears atomically (built beside, renamed into place).
        """
        entries = self.tree(digest)
        for e in entries:
            self.verify(e.digest)
        final = Path(dest) if dest else self.cache / digest.split(":", 1)[1]
        if final.is_dir() and (final / ".finetrace-complete").is_file():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(dir=final.parent, prefix=scratch_prefix(self.root.parent, ".build-")))
        try:
            for e in entries:
                target = build / e.path
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(self.path(e.digest), target)
                except OSError:
                    shutil.copyfile(self.path(e.digest), target)
            (build / ".finetrace-complete").write_text(digest + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(build, final)
            fsync_dir(final.parent)
        finally:
            if build.exists():
                shutil.rmtree(build, ignore_errors=True)
        return final

    def member_json(self, digest: str, path: str):
        """The JSON file ``path`` inside folder object ``digest``, re-hashed now.

        None only when the folder is not stored (purged) or is not a folder, or holds no such file; a
        changed or unreadable file is an IntegrityError, never None (absence and damage are different facts).
        """
        import json

        if not self.has(digest) or not self.is_tree(digest):
            return None
        for e in self.tree(digest):
            if e.path == path:
                try:
                    return json.loads(self.read_bytes(e.digest))
                except ValueError as exc:
                    raise IntegrityError(f"{path} of {digest} is not valid JSON: {exc}") from None
        return None

    def size(self, digest: str) -> int:
        if self.is_tree(digest):
            return sum(e.size for e in self.tree(digest))
        return self.path(digest).stat().st_size
