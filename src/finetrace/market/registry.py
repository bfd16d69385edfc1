"""The registry's logic, shared by the HTTP API, the web pages, the admin commands and the tests.

A publish is three steps, so that it is idempotent, resumable and atomic:

1. ``start_upload(token, manifest, signature)``: authorise (token → account → namespace owner), check the
   manifest (names, caps, licence, gates, documents, signature, pinned key) and answer which objects
   are still missing. Re-sending the same manifest resumes the same upload; an identical published
   version answers ``exists`` (a no-op); a different manifest under a taken version is refused (409).
2. ``put_object(upload, digest, stream)``: the server re-hashes the bytes, refuses a digest mismatch and
   checks the content against the path(s) the manifest gives it; accepted bytes wait in ``staging/``.
3. ``commit(upload)``: every object present and re-verified, the cross-file checks (tensor → base module
   shapes, rank, attestation), then objects enter the store and one transaction makes the version
   visible. A refused commit deletes the upload and its staged objects: nothing is stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError as DBIntegrityError

from ..canonical import CHUNK, check_digest
from ..errors import FinetraceError, IntegrityError, NotFoundError
from ..store import ObjectStore
from . import db
from .checks import Limits, Refused, check_adapter, check_file, refuse
from .migrations import WEIGHTS
from .names import confusable_with
from .package import check_shape, documents_present, manifest_digest, parse_ref, verify, verify_attestation
from .search import search as _search


class AuthError(FinetraceError):
    """A missing or unknown token (401), or a token that may not act on a namespace (403)."""

    http_status = 401
    exit_code = 4


class Forbidden(AuthError):
    http_status = 403


class Conflict(Refused):
    http_status = 409


@dataclass
class Settings:
    """How a registry runs."""

    db_url: str = "sqlite:///registry.db"  # SQLAlchemy URL (sqlite:///path or postgresql+psycopg://...)
    store: str = "registry-objects"  # folder of the content-addressed object store
    limits: Limits = field(default_factory=Limits)
    allow_unknown_bases: bool = True  # accept the publisher's shape map for bases not registered here
    title: str = "finetrace market"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _csv(values) -> str:
    vals = [str(v).strip().lower() for v in (values or []) if str(v).strip()]
    return "," + ",".join(vals) + "," if vals else ""


class Registry:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.engine, self.Session = db.connect(settings.db_url)
        root = Path(settings.store)
        self.store = ObjectStore(root / "objects", root / "cache")
        self.staging = root / "staging"
        self.dialect = self.engine.dialect.name
        self._commits = 0

    def close(self) -> None:
        if getattr(self, "_ledger", None) is not None:  # the registry's ledger (lifecycle.py)
            self._ledger.close()
        self.engine.dispose()

    # -- accounts ------------------------------------------------------------------------------
    def add_user(self, name: str, namespaces: list[str] = (), admin: bool = False) -> str:
        """Create an account owning namespace ``name`` (and ``namespaces``); returns its API token (shown once)."""
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", name):
            raise Refused(f"bad account name {name!r}", hint="lower-case letters, digits, '.', '_', '-'")
        token = "ftm_" + secrets.token_urlsafe(32)
        with self.Session.begin() as s:
            if s.scalar(select(db.Account).where(db.Account.name == name)):
                raise Conflict(f"account {name!r} exists")
            acct = db.Account(name=name, token_hash=hash_token(token), is_admin=admin)
            s.add(acct)
            s.flush()
            taken = list(s.scalars(select(db.Namespace.name)))
            for ns in dict.fromkeys([name, *namespaces]):
                parse_ref(f"{ns}/x")
                if ns in taken:
                    raise Conflict(f"namespace {ns!r} is already owned")
                twin = confusable_with(ns, taken)
                if twin:
                    raise Conflict(
                        f"namespace {ns!r} looks like the existing namespace {twin!r}",
                        hint="choose a name a reader cannot mistake for another publisher's",
                    )
                s.add(db.Namespace(name=ns, owner_id=acct.id))
        return token

    def account(self, token: str | None) -> db.Account:
        if not token:
            raise AuthError("this call needs an API token", hint="send Authorization: Bearer <token>")
        with self.Session() as s:
            acct = s.scalar(select(db.Account).where(db.Account.token_hash == hash_token(token)))
        if acct is None:
            raise AuthError("unknown API token", hint="ask the registry admin for one (`finetrace market add-user`)")
        return acct

    def add_base(self, name: str, digest: str, shapes: dict) -> None:
        """Register a base model's tensor shape map (it then overrides any map a publisher sends)."""
        check_digest(digest)
        with self.Session.begin() as s:
            row = s.get(db.BaseModelShapes, digest)
            if row is None:
                s.add(db.BaseModelShapes(digest=digest, name=name, shapes=shapes))
            else:
                row.name, row.shapes = name, shapes

    # -- publish ---------------------------------------------------------------------------------
    def start_upload(self, token: str | None, manifest: dict, signature: dict) -> dict:
        acct = self.account(token)
        if not isinstance(manifest, dict) or not isinstance(signature, dict):
            raise refuse("the request needs a manifest object and a signature object")
        check_shape(manifest)
        pkg = manifest["package"]
        ref = f"{pkg['namespace']}/{pkg['name']}@{pkg['version']}"
        mdigest = manifest_digest(manifest)
        with self.Session() as s:
            ns = s.scalar(select(db.Namespace).where(db.Namespace.name == pkg["namespace"]))
            if ns is None:
                raise Forbidden(
                    f"namespace {pkg['namespace']!r} does not exist on this registry",
                    hint="ask the admin to create it for your account",
                )
            if ns.owner_id != acct.id:
                raise Forbidden(
                    f"account {acct.name!r} may not publish into namespace {ns.name!r}",
                    hint="use a token of that namespace's owner",
                )
            existing = s.scalar(
                select(db.Version)
                .join(db.Package, db.Package.id == db.Version.package_id)
                .where(
                    db.Package.namespace_id == ns.id,
                    db.Package.name == pkg["name"],
                    db.Version.version == pkg["version"],
                )
            )
            if existing is not None:
                if existing.manifest_digest == mdigest:
                    return {"status": "exists", "ref": ref, "digest": mdigest, "missing": []}
                raise Conflict(
                    f"{ref} is already published with a different digest ({existing.manifest_digest})",
                    hint="versions are immutable: publish under a new version number",
                )
            pinned = {k.key_id for k in s.scalars(select(db.NamespaceKey).where(db.NamespaceKey.namespace_id == ns.id))}
            self._check_lookalike(s, ns, pkg["name"])
        self._check_manifest(manifest, signature, pinned)
        with self.Session.begin() as s:
            up = s.scalar(select(db.Upload).where(db.Upload.ref == ref, db.Upload.manifest_digest == mdigest))
            if up is None:
                up = db.Upload(
                    id=secrets.token_hex(16),
                    account_id=acct.id,
                    ref=ref,
                    manifest_digest=mdigest,
                    manifest=manifest,
                    signature=signature,
                )
                s.add(up)
            upload_id = up.id
        return {
            "status": "pending",
            "upload": upload_id,
            "ref": ref,
            "digest": mdigest,
            "missing": self.missing(upload_id, manifest),
        }

    def _check_lookalike(self, s, ns: db.Namespace, name: str) -> None:
        """Refuse a new package whose ``ns/name`` looks like another account's package (``names.py``)."""
        if s.scalar(select(db.Package.id).where(db.Package.namespace_id == ns.id, db.Package.name == name)):
            return  # a new version of an existing package
        others = [
            f"{a}/{b}"
            for a, b in s.execute(
                select(db.Namespace.name, db.Package.name)
                .join(db.Package, db.Package.namespace_id == db.Namespace.id)
                .where(db.Namespace.owner_id != ns.owner_id)
            )
        ]
        twin = confusable_with(f"{ns.name}/{name}", others)
        if twin:
            raise Conflict(
                f"{ns.name}/{name} looks like {twin}, published by another account",
                hint="publish under a name a buyer cannot mistake for another publisher's adapter",
            )

    # duplicates: alike train/adapters.py:apply_method on purpose (a library error turned into a finetrace error with a hint).
    def _check_manifest(self, manifest: dict, signature: dict, pinned: set[str]) -> None:
        lim = self.settings.limits
        total = sum(f["size"] for f in manifest["files"])
        if total > lim.max_package_bytes:
            raise refuse(f"the package is {total} bytes, over the cap of {lim.max_package_bytes}")
        for f in manifest["files"]:
            if f["size"] > lim.max_file_bytes:
                raise refuse(f"{f['size']} bytes exceed the per-file cap of {lim.max_file_bytes}", f["path"])
        try:
            facts = verify(manifest, signature)
        except IntegrityError as exc:
            raise Refused(
                f"signature check failed: {exc.message}",
                hint="sign the manifest with the publisher's workspace key; any change after signing breaks it",
            ) from None
        if pinned and facts["key_id"] not in pinned:
            raise Forbidden(
                f"the namespace is pinned to other publisher keys; {facts['key_id']} is not one",
                hint="publish with the workspace key that first published here",
            )
        gate = manifest.get("gate") or {}
        if gate.get("status") not in ("passed", "overridden"):
            raise refuse(
                f"eval gates not passed (status {gate.get('status', 'unknown')!r}: {gate.get('detail', 'no verdict')})",
                hint="evaluate with gates, or record an override",
            )
        missing_docs = documents_present(manifest)
        if missing_docs:
            raise refuse(
                f"required documents missing: {', '.join(missing_docs)}",
                hint="generate them with the audit stage and publish again",
            )

    def _upload(self, upload_id: str) -> db.Upload:
        with self.Session() as s:
            up = s.get(db.Upload, upload_id)
        if up is None:
            raise NotFoundError(f"no upload {upload_id!r} in progress", hint="start the publish again")
        return up

    def _staged(self, upload_id: str, digest: str) -> Path:
        return self.staging / upload_id / digest.split(":", 1)[1]

    def missing(self, upload_id: str, manifest: dict) -> list[str]:
        digests = dict.fromkeys(f["digest"] for f in manifest["files"])
        return [d for d in digests if not self._staged(upload_id, d).is_file() and not self.store.has(d)]

    def put_object(self, token: str | None, upload_id: str, digest: str, stream: BinaryIO) -> dict:
        """Receive one object of an upload; the bytes must hash to ``digest`` and pass the content checks."""
        acct = self.account(token)
        up = self._upload(upload_id)
        if up.account_id != acct.id:
            raise Forbidden("this upload belongs to another account")
        check_digest(digest)
        paths = [f for f in up.manifest["files"] if f["digest"] == digest]
        if not paths:
            raise refuse(f"object {digest} is not part of upload {upload_id}")
        limit = max(f["size"] for f in paths)
        dest = self._staged(upload_id, digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
        h, size = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as out:
                while chunk := stream.read(CHUNK):
                    size += len(chunk)
                    if size > limit:
                        raise refuse(
                            f"object {digest} is larger than the {limit} bytes the manifest declares", paths[0]["path"]
                        )
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            actual = "sha256:" + h.hexdigest()
            if actual != digest:
                raise Refused(
                    f"object {digest}: the bytes received hash to {actual}",
                    file=paths[0]["path"],
                    hint="wrong digest, or the upload was corrupted; send it again",
                )
            data = tmp.read_bytes()
            try:
                for f in paths:
                    if f["size"] != size:
                        raise refuse(f"{size} bytes received, the manifest declares {f['size']}", f["path"])
                    check_file(f["path"], data, self.settings.limits)
            except Refused:
                self.abort(upload_id)  # the signed manifest pins these bytes: this upload can never pass
                raise
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                tmp.unlink()
        return {"digest": digest, "size": size}

    def commit(self, token: str | None, upload_id: str) -> dict:
        acct = self.account(token)
        up = self._upload(upload_id)
        if up.account_id != acct.id:
            raise Forbidden("this upload belongs to another account")
        manifest = up.manifest
        missing = self.missing(upload_id, manifest)
        if missing:
            raise refuse(
                f"{len(missing)} object(s) not received yet: {', '.join(missing[:3])}",
                hint="PUT them, then commit again",
            )
        try:  # any failure, not only a refusal, drops the upload and its staged objects
            parsed = self._verify_objects(upload_id, manifest)
            self._check_contents(manifest, parsed)
            for d in dict.fromkeys(f["digest"] for f in manifest["files"]):
                staged = self._staged(upload_id, d)
                if staged.is_file():
                    got = self.store.put_file(staged)
                    if got != d:  # the staged file changed under us
                        raise IntegrityError(f"staged object {d} changed on disk (now {got})")
            result = self._make_visible(up, acct)
        except BaseException:
            self.abort(upload_id)
            raise
        self.abort(upload_id)  # drop staging and the upload row
        self._commits += 1
        if self.dialect == "sqlite" and self._commits & (self._commits - 1) == 0:
            db.analyze(self.engine)  # after 1, 2, 4, 8... publishes: statistics follow the growth
        return result

    def _verify_objects(self, upload_id: str, manifest: dict) -> dict:
        parsed: dict = {}
        for f in manifest["files"]:
            p = self._staged(upload_id, f["digest"])
            if not p.is_file():
                p = self.store.file(f["digest"])  # already stored by another version: re-hashed here
            data = p.read_bytes()
            if hashlib.sha256(data).hexdigest() != f["digest"].split(":", 1)[1]:
                raise IntegrityError(f"object {f['digest']} ({f['path']}) no longer matches its digest")
            if len(data) != f["size"]:  # also for objects already stored, which were never PUT again
                raise refuse(
                    f"the manifest declares {f['size']} bytes, the object {f['digest']} has {len(data)}",
                    f["path"],
                    hint="declare each file's real size",
                )
            parsed[f["path"]] = (check_file(f["path"], data, self.settings.limits), data)
        return parsed

    def _check_contents(self, manifest: dict, parsed: dict) -> None:
        cfg = parsed["adapter/adapter_config.json"][0]["json"]
        meta = parsed["adapter/finetrace_adapter.json"][0]["json"]
        tensors = parsed["adapter/adapter_model.safetensors"][0]["tensors"]
        base = manifest["base_model"]
        if not isinstance(cfg, dict) or not isinstance(meta, dict):
            raise refuse("adapter_config.json and finetrace_adapter.json must be JSON objects")
        if meta.get("base_model") != base["digest"]:
            raise refuse(
                f"finetrace_adapter.json names base {meta.get('base_model')}, the manifest declares {base['digest']}",
                "adapter/finetrace_adapter.json",
            )
        with self.Session() as s:
            known = s.get(db.BaseModelShapes, base["digest"])
        shapes = known.shapes if known else None
        if shapes is None:
            if not self.settings.allow_unknown_bases:
                raise refuse(
                    f"base model {base['digest']} is not known to this registry",
                    hint="ask the admin to register it (`finetrace market add-base`)",
                )
            shapes = base.get("shapes")
            if not isinstance(shapes, dict) or not shapes:
                raise Refused("the base model's tensor shape map is needed", field="manifest.base_model.shapes")
        elif base.get("shapes") not in (None, shapes):
            raise refuse("the shape map sent for the base model differs from the registry's for that digest")
        check_adapter(cfg, tensors, shapes, self.settings.limits)
        if "attestation/attestation.dsse.json" in parsed:
            try:
                verify_attestation(
                    parsed["attestation/attestation.dsse.json"][0]["json"],
                    manifest["publisher"]["public_key"],
                    manifest,
                )
            except IntegrityError as exc:
                raise Refused(f"attestation check failed: {exc.message}") from None

    def _make_visible(self, up: db.Upload, acct: db.Account) -> dict:
        m = up.manifest
        pkg = m["package"]
        metrics = {
            k: float(v)
            for k, v in (m.get("metrics") or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        primary = m.get("primary_metric")
        card = ""
        for f in m["files"]:
            if f["path"].startswith("documents/model_card"):
                card = self.store.path(f["digest"]).read_bytes().decode("utf-8", "replace")[:20000]
        search_text = " ".join(
            [
                pkg["namespace"],
                pkg["name"],
                m.get("description", ""),
                " ".join(m.get("domain") or []),
                " ".join(m.get("task") or []),
                m["base_model"].get("name", ""),
                card,
            ]
        )
        try:
            with self.Session.begin() as s:
                ns = s.scalar(select(db.Namespace).where(db.Namespace.name == pkg["namespace"]))
                p = s.scalar(select(db.Package).where(db.Package.namespace_id == ns.id, db.Package.name == pkg["name"]))
                if p is None:
                    p = db.Package(namespace_id=ns.id, name=pkg["name"], downloads=0)
                    s.add(p)
                    s.flush()
                v = db.Version(
                    package_id=p.id,
                    version=pkg["version"],
                    ref=up.ref,
                    manifest_digest=up.manifest_digest,
                    manifest=m,
                    signature=up.signature,
                    key_id=up.signature["key_id"],
                    description=m.get("description", ""),
                    license_id=m["license"]["id"],
                    base_name=m["base_model"].get("name", ""),
                    base_digest=m["base_model"]["digest"],
                    domains=_csv(m.get("domain")),
                    tasks=_csv(m.get("task")),
                    score=metrics.get(primary) if primary else None,
                    search_text=search_text,
                    publisher=acct.name,
                    weights_digest=next((f["digest"] for f in m["files"] if f["path"] == WEIGHTS), None),
                )
                s.add(v)
                s.flush()
                for k, val in metrics.items():
                    s.add(db.Metric(version_id=v.id, name=k, value=val))
                db.index_text(s, v)
                p.latest_version_id = v.id
                if not s.scalar(
                    select(db.NamespaceKey).where(
                        db.NamespaceKey.namespace_id == ns.id, db.NamespaceKey.key_id == v.key_id
                    )
                ):
                    if not s.scalar(
                        select(func.count()).select_from(db.NamespaceKey).where(db.NamespaceKey.namespace_id == ns.id)
                    ):
                        s.add(
                            db.NamespaceKey(
                                namespace_id=ns.id, key_id=v.key_id, public_key=m["publisher"]["public_key"]
                            )
                        )
        except DBIntegrityError:
            # a concurrent commit of the same version won the race
            existing = self.version(pkg["namespace"], pkg["name"], pkg["version"])
            if existing["digest"] == up.manifest_digest:
                return {"status": "exists", "ref": up.ref, "digest": up.manifest_digest}
            raise Conflict(f"{up.ref} was published concurrently with a different digest") from None
        return {"status": "published", "ref": up.ref, "digest": up.manifest_digest}

    def abort(self, upload_id: str) -> None:
        """Forget an upload and its staged objects."""
        shutil.rmtree(self.staging / upload_id, ignore_errors=True)
        with self.Session.begin() as s:
            up = s.get(db.Upload, upload_id)
            if up is not None:
                s.delete(up)

    # -- reading ---------------------------------------------------------------------------------
    def _version_row(self, s, ns: str, name: str, version: str | None):
        q = (
            select(db.Version, db.Package)
            .join(db.Package, db.Package.id == db.Version.package_id)
            .join(db.Namespace, db.Namespace.id == db.Package.namespace_id)
            .where(db.Namespace.name == ns, db.Package.name == name)
        )
        q = (
            q.where(db.Version.version == version)
            if version
            else q.where(db.Version.id == db.Package.latest_version_id)
        )
        row = s.execute(q).first()
        if row is None:
            raise NotFoundError(f"no package {ns}/{name}" + (f"@{version}" if version else ""))
        return row

    def version(self, ns: str, name: str, version: str | None = None) -> dict:
        """A version (the latest not yanked without ``version``): manifest, signature and facts. Reading it
        counts no download: serving its weights does (``lifecycle.count_download``)."""
        with self.Session() as s:
            v, p = self._version_row(s, ns, name, version)
            versions = [
                r[0]
                for r in s.execute(
                    select(db.Version.version).where(db.Version.package_id == p.id).order_by(db.Version.id)
                )
            ]
            return {
                "ref": v.ref,
                "namespace": ns,
                "name": name,
                "version": v.version,
                "digest": v.manifest_digest,
                "manifest": v.manifest,
                "signature": v.signature,
                "downloads": p.downloads,
                "publisher": v.publisher,
                "created": v.created.isoformat(),
                "versions": versions,
                "yanked": bool(v.yanked),
                "yanked_reason": v.yanked_reason or "",
            }

    def object_path(self, digest: str) -> Path:
        """A stored object (only committed objects are ever served), re-hashed now."""
        check_digest(digest)
        if not self.store.has(digest):
            raise NotFoundError(f"object {digest} is not in this registry")
        return self.store.file(digest)

    def badge(self, info: dict) -> dict:
        """The verification badge, computed now from the stored manifest, signature and attestation."""
        m, sig = info["manifest"], info["signature"]
        out = {
            "signature": False,
            "checkpoint": False,
            "inclusion": False,
            "attestation": False,
            "documents": not documents_present(m),
            "gates": (m.get("gate") or {}).get("status", "unknown"),
            "key_id": sig.get("key_id"),
        }
        try:
            facts = verify(m, sig)
            out.update(signature=True, checkpoint=facts["checkpoint"], inclusion=facts["inclusion"])
        except IntegrityError:
            pass
        att = next((f for f in m["files"] if f["path"] == "attestation/attestation.dsse.json"), None)
        if att and out["signature"]:
            try:
                env = json.loads(self.object_path(att["digest"]).read_bytes())
                verify_attestation(env, m["publisher"]["public_key"], m)
                out["attestation"] = True
            except (FinetraceError, ValueError):
                pass
        out["provenance"] = out["checkpoint"] and out["inclusion"] and out["attestation"]
        out["level"] = (
            "verified"
            if out["signature"] and out["provenance"] and out["documents"]
            else "partial"
            if out["signature"]
            else "unverified"
        )
        return out

    def read_text(self, manifest: dict, path: str, limit: int = 200_000) -> str | None:
        f = next((f for f in manifest["files"] if f["path"] == path), None)
        if f is None or not self.store.has(f["digest"]):
            return None
        return self.store.path(f["digest"]).read_bytes()[:limit].decode("utf-8", "replace")

    # -- search ----------------------------------------------------------------------------------
    # ``Registry.search`` is ``finetrace.market.search.search`` itself (its signature and docstring are there).
    search = _search


from .search import parse_metric_filter  # noqa: E402,F401  (one copy, in search.py; re-exported)
