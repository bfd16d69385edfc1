"""What happens to packages after publish: versions listing, download counts, yanking, and garbage
collection of upload staging. Each change the registry makes on its own authority is an event in the
registry's ledger (``STORE/ledger/ledger.db``, the same RFC 6962 Merkle log as a workspace's, signed with
the registry's own key), so an operator cannot remove a yank or a purge without it showing.

    versions(reg, ns, name)                       every version, newest first, with yanked and downloads
    count_download(reg, digest)                   serving an adapter's weights counts one download of its
                                                  version (a client fetches them only after its own checks:
                                                  a refused pull counts nothing)
    yank(reg, token, "ns/name@1.0", reason)        the version stays served and verifiable by exact
                                                   version; "latest" (search, default pull) skips it
    gc_staging(reg, max_age_s)                     uploads never committed within the deadline are removed

Events: ``market.yank`` / ``market.unyank`` {ref, digest, reason, by}; ``market.staging_gc`` {upload,
ref, digest, age_s, files, bytes} (``upload`` None and ``ref`` None for a staging folder with no upload).
"""

from __future__ import annotations

import shutil
import time
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select

from ..errors import NotFoundError
from ..ledger import Ledger
from ..ledger.signing import KeyPair
from . import db
from .package import parse_ref

STAGING_MAX_AGE_S = 24 * 3600  # an upload not committed within a day is dropped


def registry_ledger(reg) -> Ledger:
    """The registry's own ledger (created, with its signing key, on first use)."""
    led = getattr(reg, "_ledger", None)
    if led is None:
        folder = Path(reg.settings.store) / "ledger"
        keys = KeyPair.load(folder) if (folder / "workspace.key").is_file() else KeyPair.create(folder)
        path = folder / "ledger.db"
        led = Ledger(path, keys).open() if path.is_file() else Ledger.create(path, keys)
        reg._ledger = led
    return led


def count_download(reg, digest: str) -> bool:
    """Count one download of the version whose weights are ``digest`` (and of its package); False when the
    object is no version's weights. Weights published twice count for the newest version holding them."""
    V = db.Version
    with reg.Session.begin() as s:
        v = s.scalar(select(V).where(V.weights_digest == digest).order_by(V.yanked, V.id.desc()).limit(1))
        if v is None:
            return False
        v.downloads = (v.downloads or 0) + 1
        pkg = s.get(db.Package, v.package_id)
        pkg.downloads = (pkg.downloads or 0) + 1
    return True


def versions(reg, ns: str, name: str) -> list[dict]:
    """Every version of ``ns/name``, newest first: version, digest, created, yanked, reason, downloads."""
    V, P, N = db.Version, db.Package, db.Namespace
    with reg.Session() as s:
        rows = s.execute(
            select(
                V.version,
                V.manifest_digest,
                V.created,
                V.yanked,
                V.yanked_reason,
                V.downloads,
                V.id == P.latest_version_id,
            )
            .join(P, P.id == V.package_id)
            .join(N, N.id == P.namespace_id)
            .where(N.name == ns, P.name == name)
            .order_by(V.id.desc())
        ).all()
    if not rows:
        raise NotFoundError(f"no package {ns}/{name}")
    return [
        {
            "version": v,
            "digest": d,
            "created": c.isoformat(),
            "yanked": bool(y),
            "yanked_reason": r or "",
            "downloads": int(dl or 0),
            "latest": bool(latest),
        }
        for v, d, c, y, r, dl, latest in rows
    ]


def yank(reg, token: str | None, ref: str, reason: str = "", undo: bool = False) -> dict:
    """Yank (or, with ``undo``, restore) ``ns/name@version``; only the namespace's owner may.

    The package's latest version becomes its newest version that is not yanked (none: it leaves search).
    Raises ``AuthError``/``Forbidden``, ``NotFoundError``."""
    from .registry import Forbidden

    acct = reg.account(token)
    ns, name, version = parse_ref(ref)
    if not version:
        raise NotFoundError(f"yank needs a version: {ref}@<version>")
    V, P, N = db.Version, db.Package, db.Namespace
    with reg.Session.begin() as s:
        row = s.execute(
            select(V, P, N)
            .join(P, P.id == V.package_id)
            .join(N, N.id == P.namespace_id)
            .where(N.name == ns, P.name == name, V.version == version)
        ).first()
        if row is None:
            raise NotFoundError(f"no package {ns}/{name}@{version}")
        v, p, n = row
        if n.owner_id != acct.id and not acct.is_admin:
            raise Forbidden(
                f"account {acct.name!r} may not yank in namespace {ns!r}", hint="use a token of that namespace's owner"
            )
        v.yanked, v.yanked_reason = (not undo), ("" if undo else reason)
        s.flush()
        p.latest_version_id = s.scalar(select(func.max(V.id)).where(V.package_id == p.id, V.yanked.is_(False)))
        digest, latest = v.manifest_digest, p.latest_version_id
    registry_ledger(reg).append(
        "market.unyank" if undo else "market.yank",
        {"ref": f"{ns}/{name}@{version}", "digest": digest, "reason": reason, "by": acct.name},
    )
    return {"ref": f"{ns}/{name}@{version}", "yanked": not undo, "digest": digest, "latest_version_id": latest}


def _tree_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def gc_staging(reg, max_age_s: float = STAGING_MAX_AGE_S, now: datetime | None = None) -> list[dict]:
    """Remove uploads started more than ``max_age_s`` ago and never committed, with their staged objects,
    and staging folders older than that which no upload owns; one ``market.staging_gc`` event each.
    Returns the events' data."""
    now = now or db.utcnow()
    cutoff = now - timedelta(seconds=max_age_s)
    with reg.Session() as s:
        stale = s.execute(
            select(db.Upload.id, db.Upload.ref, db.Upload.manifest_digest, db.Upload.created).where(
                db.Upload.created < cutoff
            )
        ).all()
        live = set(s.scalars(select(db.Upload.id)))
    removed = []
    for uid, ref, digest, created in stale:
        folder = reg.staging / uid
        files, size = _tree_size(folder) if folder.is_dir() else (0, 0)
        reg.abort(uid)
        removed.append(
            {
                "upload": uid,
                "ref": ref,
                "digest": digest,
                "age_s": int((now - created).total_seconds()),
                "files": files,
                "bytes": size,
            }
        )
    if reg.staging.is_dir():
        wall_cutoff = time.time() - max_age_s
        for folder in reg.staging.iterdir():
            if folder.name in live or not folder.is_dir() or folder.stat().st_mtime > wall_cutoff:
                continue
            files, size = _tree_size(folder)
            age = int(time.time() - folder.stat().st_mtime)
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(
                {
                    "upload": None,
                    "folder": folder.name,
                    "ref": None,
                    "digest": None,
                    "age_s": age,
                    "files": files,
                    "bytes": size,
                }
            )
    if removed:
        registry_ledger(reg).append_many("market.staging_gc", removed, who="registry")
    return removed
