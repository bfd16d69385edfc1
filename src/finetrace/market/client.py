"""The registry client: build and publish a package from a workspace, search, and pull with verification.

    build_package(ws, adapter_ref, "ns/name@1.0", ...) -> Package        # manifest, signature, local files
    publish(ws, adapter_ref, "ns/name@1.0", registry, token, ...) -> dict
    search(registry, query, **filters) -> dict
    pull(ws, "ns/name@1.0", registry, trust_keys=[...], accept_license=False) -> Artifact

``publish`` refuses locally what the registry would refuse (gates not passed, files off the allow-list,
documents missing) before sending anything. ``pull`` trusts nothing the registry says: every file is
re-hashed, the manifest signature is checked and its key must be one the buyer trusts, the adapter is
re-checked against the *local* base model's shapes, and the rebuilt adapter folder must hash to the
digest the publisher signed. Then a ``pull`` run records the adapter, usable by train (``init_from``),
evaluate and serve like any trained adapter.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..canonical import CHUNK, sha256_file
from ..errors import FinetraceError, InputError, IntegrityError, NotFoundError
from ..evaluate.schema import EvalReport
from ..ledger import Artifact
from ..ledger.adapter import adapter_record
from ..ledger.clearance import clearance
from ..ledger.signing import public_to_b64
from ..workspace import Workspace
from .checks import (
    DOCUMENT_EXTS,
    DOCUMENT_KINDS,
    base_shapes_from_folder,
    check_adapter,
    check_file,
    check_path,
    refuse,
)
from .package import (
    FORMAT,
    documents_present,
    license_needs_acceptance,
    make_attestation,
    manifest_digest,
    parse_ref,
    sign,
    verify,
    verify_attestation,
)

ATTESTATION = "attestation/attestation.dsse.json"


class RegistryError(FinetraceError):
    """The registry answered with an error; ``status`` is its HTTP status."""

    def __init__(self, message: str, status: int, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.status = status
        self.exit_code = {401: 4, 403: 4, 404: 2, 409: 5}.get(status, 1)


@dataclass
class Package:
    manifest: dict
    signature: dict
    files: dict[str, Path] = field(default_factory=dict)  # package path -> local file

    @property
    def digest(self) -> str:
        return manifest_digest(self.manifest)


def _http(registry: str, token: str | None = None):
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=registry.rstrip("/"), headers=headers, timeout=120)


def _check(resp) -> dict:
    if resp.status_code >= 400:
        try:
            body = resp.json()
            msg, hint = body.get("error") or resp.text, body.get("hint")
        except ValueError:
            msg, hint = resp.text[:500], None
        raise RegistryError(f"registry: {msg}", resp.status_code, hint=hint)
    return resp.json()


# -- building ------------------------------------------------------------------------------------
def _find_documents(ws: Workspace, adapter: str) -> dict[str, Path]:
    """Document artifacts that name this adapter in their metadata (written by the audit stage)."""
    out: dict[str, Path] = {}
    for art in ws.ledger.artifacts("document"):
        md = art.metadata
        if adapter not in (md.get("adapter"), md.get("subject")):
            continue
        kind = str(md.get("document") or md.get("doc_kind") or md.get("type") or "").lower().replace("-", "_")
        kind = {"card": "model_card", "annex4": "annex_iv", "ab_2013": "ab2013", "attestation": "attestation"}.get(
            kind, kind
        )
        if kind not in (*DOCUMENT_KINDS, "attestation"):
            continue
        if ws.store.is_tree(art.digest):
            folder = ws.store.materialize(art.digest)
            files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
            pick = next((p for p in files if p.suffix[1:] in DOCUMENT_EXTS), None)
            if pick is None:
                continue
            out[kind] = pick
        else:
            out[kind] = ws.store.file(art.digest)
    return out


def _intended_use_missing(ws: Workspace, adapter: str) -> list[str]:
    """What the newest document run for this adapter says is missing of its intended use (audit stage)."""
    latest: dict[str, list] = {}
    for art in ws.ledger.artifacts("document"):  # oldest first: the newest of each kind wins
        md = art.metadata
        if md.get("adapter") == adapter and "intended_use_missing" in md:
            latest[str(md.get("document"))] = list(md.get("intended_use_missing") or [])
    return sorted({m for v in latest.values() for m in v})


def _eval_facts(ws: Workspace, report_digest: str | None, adapter: str) -> tuple[dict, dict, dict]:
    """(files, facts, lineage extras) from the eval report behind the gate verdict."""
    if not report_digest or not ws.store.has(report_digest) or not ws.store.is_tree(report_digest):
        return {}, {}, {}
    folder = ws.store.materialize(report_digest)
    files = {f"eval/{n}": folder / n for n in ("report.json", "report.html") if (folder / n).is_file()}
    facts: dict = {}
    if (folder / "report.json").is_file():
        rep = EvalReport.parse(json.loads((folder / "report.json").read_text("utf-8")), "eval/report.json")
        mine, base = rep.subject(adapter), rep.base
        if mine:
            facts["metrics"] = mine.values()
            cats = mine.bias.categories if mine.bias else {}
            facts["bias"] = {c: {"flip_rate": v.flip_rate, "gap": v.gap} for c, v in cats.items()}
        if base:
            facts["base_metrics"] = base.values()
        facts["primary_metric"] = rep.primary_metric
        return files, facts, {"eval_report": report_digest, "eval_dataset": rep.dataset.ref}
    return files, facts, {"eval_report": report_digest}


def _add_documents(ws: Workspace, art, files: dict[str, Path], documents, attestation) -> None:
    """Add the adapter's documents (recorded, then ``documents``, then ``attestation``) to ``files``;
    refused when the intended use and limitations are missing and no documents are given."""
    docs = _find_documents(ws, art.digest)
    missing = _intended_use_missing(ws, art.digest)
    if missing and not documents:
        raise InputError(
            f"{art.ref}: its documents lack the intended use and limitations ({', '.join(missing)})",
            hint="run `finetrace docs ADAPTER@V --intended-use FILE.yaml`, then publish again",
        )
    for kind, p in (documents or {}).items():
        docs[kind] = Path(p)
    if attestation:
        docs["attestation"] = Path(attestation)
    for kind, p in docs.items():
        if not Path(p).is_file():
            raise InputError(f"no such file: {p}", field=f"document {kind}")
        if kind == "attestation":
            files[ATTESTATION] = Path(p)
        else:
            ext = Path(p).suffix[1:].lower() if Path(p).suffix[1:].lower() in DOCUMENT_EXTS else "md"
            files[f"documents/{kind}.{ext}"] = Path(p)


def _self_attestation(ws: Workspace, adapter_digest: str, files: dict[str, Path], lineage: dict) -> Path:
    """Fallback until the audit stage's attestation exists: the publisher attests the lineage itself."""
    tmp_att = ws.root / "cache" / "market" / f"attestation-{adapter_digest.split(':')[1][:16]}.json"
    tmp_att.parent.mkdir(parents=True, exist_ok=True)
    listed = [{"path": p, "size": f.stat().st_size, "digest": sha256_file(f)} for p, f in files.items()]
    tmp_att.write_text(json.dumps(make_attestation(ws.keys, listed, {"adapter": adapter_digest, "lineage": lineage})))
    return tmp_att


def _ledger_proof(ws: Workspace, adapter_digest: str):
    """The signed checkpoint and the adapter's ledger entry with its inclusion proof (``{}`` if unrecorded)."""
    seq = next(
        (e.seq for e in ws.ledger.entries(type="artifact.added") if e.data.get("digest") == adapter_digest), None
    )
    # the earliest signed checkpoint covering the adapter's entry: rebuilding the package later gives the
    # same manifest (so a re-publish is a no-op), however much the ledger has grown since
    cp = next((c for c in ws.ledger.checkpoints() if seq is not None and c.size > seq), None) or ws.checkpoint()
    entry = {}
    if seq is not None:
        entry = {
            "seq": seq,
            "body": base64.b64encode(ws.ledger.raw_entry(seq)).decode(),
            "proof": [h.hex() for h in ws.ledger.inclusion_proof(seq, cp.size)],
        }
    return cp, entry


def build_package(
    ws: Workspace,
    adapter_ref: str,
    target: str,
    *,
    license_id: str = "Apache-2.0",
    license_terms: str | None = None,
    domain: list[str] = (),
    task: list[str] = (),
    description: str = "",
    documents: dict[str, str | Path] | None = None,
    attestation: str | Path | None = None,
    min_serve_agreement: float | None = None,
) -> Package:
    """Collect an adapter, its evidence and metadata into a signed package (nothing is sent).

    Refused when the gates did not pass, and (``serve.parity.publish_gate``) when the eval set replayed
    through the serving engine agrees with the evaluated answers on less than ``min_serve_agreement``
    (default 1.0: token-exact on the native engine)."""
    ns, name, version = parse_ref(target)
    if not version:
        raise refuse(f"publish needs a version: {target}@<version>", hint="e.g. --to acme/legal-lora@1.0.0")
    art = ws.ledger.resolve(adapter_ref, kind="adapter")
    clr = clearance(ws.ledger, art.digest)
    if not clr.allowed:
        raise refuse(
            f"{art.ref} may not be published: {clr.detail}",
            hint="evaluate it with gates (`finetrace eval`), or record an override",
        )
    from ..serve.parity import publish_gate

    publish_gate(ws, art.digest, clr.report, min_serve_agreement)
    files: dict[str, Path] = {}
    for e in ws.store.tree(art.digest):
        path = f"adapter/{e.path}"
        check_path(path)  # refuse files the registry would refuse, before anything is sent
        files[path] = ws.store.path(e.digest)
    rec = adapter_record(ws, art.digest)
    ameta, base_digest, run = rec.meta, rec.base_digest, rec.run
    if rec.base is None:
        raise NotFoundError(
            f"{art.ref}: its base model {base_digest} is not recorded in this workspace",
            hint="acquire the base model it was trained on (`finetrace models add`)",
        )
    base_art = rec.base
    base_dir = ws.store.materialize(base_digest)
    eval_files, facts, eval_lineage = _eval_facts(ws, clr.report, art.digest)
    files.update(eval_files)
    _add_documents(ws, art, files, documents, attestation)
    lineage = {
        "adapter": art.digest,
        "adapter_ref": art.ref,
        "producer_run": run.id if run else None,
        "run_kind": run.kind if run else None,
        "base_model": base_digest,
        "base_model_ref": base_art.ref,
        "dataset": ameta.get("dataset") or next((d.digest for d in rec.datasets), None),
        "dataset_ref": ameta.get("dataset_ref"),
        "parent": art.metadata.get("parent") or ameta.get("parent"),
        **eval_lineage,
    }
    lineage = {k: v for k, v in lineage.items() if v is not None}
    keys = ws.keys
    if ATTESTATION not in files:
        files[ATTESTATION] = _self_attestation(ws, art.digest, files, lineage)
    cp, entry = _ledger_proof(ws, art.digest)
    lic = {"id": license_id}
    if license_terms:
        lic["terms"] = license_terms
    manifest = {
        "format": FORMAT,
        "package": {"namespace": ns, "name": name, "version": version},
        "description": description,
        "domain": sorted({d.lower() for d in domain}),
        "task": sorted({t.lower() for t in task}),
        "license": lic,
        "files": sorted(
            ({"path": p, "size": f.stat().st_size, "digest": sha256_file(f)} for p, f in files.items()),
            key=lambda f: f["path"],
        ),
        "adapter": {
            "digest": art.digest,
            **{
                k: art.metadata.get(k)
                for k in (
                    "method",
                    "r",
                    "target_modules",
                    "tokenizer_sha256",
                    "chat_template_sha256",
                    "eos_token",
                    "eos_token_id",
                )
                if k in art.metadata
            },
        },
        "base_model": {"name": base_art.ref, "digest": base_digest, "shapes": base_shapes_from_folder(base_dir)},
        "gate": {"status": clr.status, "detail": clr.detail, "report": clr.report},
        "metrics": facts.get("metrics", {}),
        "base_metrics": facts.get("base_metrics", {}),
        "primary_metric": facts.get("primary_metric") or (sorted(facts.get("metrics", {})) or [None])[0],
        "bias": facts.get("bias", {}),
        "lineage": lineage,
        "publisher": {
            "key_id": keys.key_id,
            "public_key": public_to_b64(keys.public),
            "checkpoint": cp.to_dict(),
            "entry": entry,
        },
    }
    missing = documents_present(manifest)
    if missing:
        raise refuse(
            f"required documents missing: {', '.join(missing)}",
            hint="generate them with the audit stage, or pass --document KIND=PATH",
        )
    return Package(manifest, sign(manifest, keys), files)


# -- publishing ----------------------------------------------------------------------------------
def upload(pkg: Package, registry: str, token: str) -> dict:
    """Send a built package: start (or resume) the upload, PUT what is missing, commit."""
    with _http(registry, token) as http:
        start = _check(http.post("/api/v1/uploads", json={"manifest": pkg.manifest, "signature": pkg.signature}))
        if start["status"] == "exists":
            return {**start, "uploaded": 0}
        by_digest = {f["digest"]: pkg.files[f["path"]] for f in pkg.manifest["files"]}
        for d in start["missing"]:
            with open(by_digest[d], "rb") as fh:
                _check(http.put(f"/api/v1/uploads/{start['upload']}/objects/{d}", content=fh.read()))
        done = _check(http.post(f"/api/v1/uploads/{start['upload']}/commit"))
        return {**done, "uploaded": len(start["missing"])}


def publish(ws: Workspace, adapter_ref: str, target: str, registry: str, token: str, **options) -> dict:
    """Build, sign and upload ``adapter_ref`` as ``target`` (``ns/name@version``); records a publish run."""
    pkg = build_package(ws, adapter_ref, target, **options)
    with ws.ledger.run(
        "publish",
        config={"registry": registry, "package": target, "manifest": pkg.digest},
        inputs=[pkg.manifest["adapter"]["digest"]],
    ) as run:
        res = upload(pkg, registry, token)
        run.metrics.update({"uploaded_objects": res["uploaded"], "status": res["status"]})
    return res


def search(registry: str, query: str = "", **filters) -> dict:
    params = {
        "q": query,
        **{
            k: (str(v).lower() if isinstance(v, bool) else v) for k, v in filters.items() if v not in (None, "", [], ())
        },
    }
    with _http(registry) as http:
        return _check(http.get("/api/v1/search", params=params))


# -- pulling -------------------------------------------------------------------------------------
def _pull_scratch(ws: Workspace) -> Path:
    """A fresh ``cache/.pull-<pid>-*`` folder; those of pulls whose process is gone (killed) are removed."""
    import os

    cache = ws.root / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.glob(".pull-*"):
        pid = old.name.split("-")[1]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=cache, prefix=f".pull-{os.getpid()}-"))


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _download(http, f: dict, tmp: Path) -> None:
    """Stream the manifest's file ``f`` into ``tmp``, checking its size and digest against the signed ones."""
    check_path(f["path"])
    dest = tmp / f["path"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    h, size = hashlib.sha256(), 0
    with http.stream("GET", f"/api/v1/objects/{f['digest']}") as resp:
        if resp.status_code >= 400:
            resp.read()
            _check(resp)
        with open(dest, "wb") as out:
            for chunk in resp.iter_bytes(CHUNK):
                size += len(chunk)
                if size > f["size"]:
                    raise IntegrityError(f"{f['path']}: more bytes than the {f['size']} signed")
                h.update(chunk)
                out.write(chunk)
    if "sha256:" + h.hexdigest() != f["digest"] or size != f["size"]:
        raise IntegrityError(
            f"{f['path']}: downloaded bytes hash to sha256:{h.hexdigest()}, the signed manifest says {f['digest']}"
        )


def pull(
    ws: Workspace,
    ref: str,
    registry: str,
    trust_keys: list[str] = (),
    accept_license: bool = False,
    name: str | None = None,
    allow_yanked: bool = False,
    allow_template_change: bool = False,
) -> Artifact:
    """Download, verify and record package ``ref`` as an ``adapter`` artifact (see the module docstring)."""
    ns, pname, version = parse_ref(ref)
    with _http(registry) as http:
        info = _check(
            http.get(f"/api/v1/packages/{ns}/{pname}" + (f"/{version}" if version else ""), params={"pull": 1})
        )
        manifest, signature = info["manifest"], info["signature"]
        if info.get("yanked") and not allow_yanked:
            raise InputError(
                f"{info['ref']} was yanked by its publisher: {info.get('yanked_reason') or 'no reason given'}",
                hint="pull another version (without @VERSION: the latest not yanked), or pass "
                "--allow-yanked if you need exactly this one",
            )
        if manifest_digest(manifest) != info["digest"]:
            raise IntegrityError(f"{info['ref']}: the manifest does not hash to the digest the registry states")
        facts = verify(manifest, signature)
        if facts["key_id"] not in set(trust_keys):
            raise IntegrityError(
                f"{info['ref']} is signed by {facts['key_id']}, which is not a trusted key",
                hint=f"if you trust this publisher, pass --trust-key {facts['key_id']}",
            )
        lic = manifest["license"]
        if license_needs_acceptance(lic) and not accept_license:
            terms = lic.get("terms") or f"licence {lic['id']}"
            raise InputError(
                f"{info['ref']} is under terms that must be accepted:\n{terms}",
                hint="read them, then pass --accept-license",
            )
        base_digest = manifest["base_model"]["digest"]
        try:
            base_art = ws.ledger.artifact(base_digest)
        except NotFoundError:
            raise NotFoundError(
                f"{info['ref']} needs base model {manifest['base_model'].get('name')} "
                f"({base_digest}), which is not in this workspace",
                hint="add that exact base model first (`finetrace models add`)",
            ) from None
        if base_art.kind != "base_model":
            raise InputError(f"{base_digest} is a {base_art.kind} here, not a base model")
        from . import template_check  # the adapter's chat template must be the local base's known-good one

        template_check.check(
            template_check.compare_identity(manifest["adapter"], ws.store.materialize(base_digest)),
            info["ref"],
            allow_template_change,
        )
        tmp = _pull_scratch(ws)
        try:
            for f in manifest["files"]:
                _download(http, f, tmp)
            parsed = {f["path"]: check_file(f["path"], (tmp / f["path"]).read_bytes()) for f in manifest["files"]}
            check_adapter(
                parsed["adapter/adapter_config.json"]["json"],
                parsed["adapter/adapter_model.safetensors"]["tensors"],
                base_shapes_from_folder(ws.store.materialize(base_digest)),
            )
            if ATTESTATION in parsed:
                verify_attestation(parsed[ATTESTATION]["json"], manifest["publisher"]["public_key"], manifest)
            adapter_digest = ws.store.put_dir(tmp / "adapter")
            if adapter_digest != manifest["adapter"]["digest"]:
                raise IntegrityError(
                    f"the pulled adapter folder hashes to {adapter_digest}, the publisher "
                    f"signed {manifest['adapter']['digest']}"
                )
            doc_digests = {
                f["path"]: ws.store.put_file(tmp / f["path"])
                for f in manifest["files"]
                if f["path"].startswith(("documents/", "attestation/"))
            }
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    market = {
        "registry": registry,
        "package": info["ref"],
        "manifest": info["digest"],
        "key_id": facts["key_id"],
        "license": lic["id"],
    }
    meta = {k: v for k, v in manifest["adapter"].items() if k != "digest"}
    meta.update(base_model=base_digest, market=market)
    config = {**market, "accepted_license": bool(accept_license and license_needs_acceptance(lic))}
    with ws.ledger.run("pull", config=config, inputs=[base_digest]) as run:
        art = run.output("adapter", adapter_digest, name=name or f"{ns}/{pname}", metadata=meta)
        for path, d in doc_digests.items():
            kind = Path(path).stem.split(".")[0]
            try:
                run.output(
                    "document",
                    d,
                    metadata={"adapter": adapter_digest, "document": kind, "package": info["ref"], "path": path},
                )
            except InputError:
                pass  # the same bytes are already recorded as another kind of artifact here
        run.metrics["files"] = len(manifest["files"])
    return art


# -- lifecycle -----------------------------------------------------------------------------------
def versions(registry: str, ref: str) -> dict:
    """Every version of ``ns/name`` with yanked, downloads and which one is latest."""
    ns, name, _ = parse_ref(ref)
    with _http(registry) as http:
        return _check(http.get(f"/api/v1/versions/{ns}/{name}"))


def yank(registry: str, token: str, ref: str, reason: str = "", undo: bool = False) -> dict:
    """Yank (or restore) ``ns/name@version`` on the registry (namespace owner only)."""
    ns, name, version = parse_ref(ref)
    if not version:
        raise InputError(f"yank needs a version: {ref}@<version>", field="REF")
    with _http(registry, token) as http:
        return _check(http.post(f"/api/v1/packages/{ns}/{name}/{version}/yank", json={"reason": reason, "undo": undo}))
