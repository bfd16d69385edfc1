"""The package manifest: what is signed, and how the registry and a buyer verify it.

A package ``namespace/name@version`` is a set of files (``checks.ALLOWED_FILES`` plus
``documents/<kind>.<ext>``) and one *manifest*, canonical JSON of every file's path, size and digest plus
the metadata (base model identity and shape map, licence, tags, metrics, gate verdict, lineage, the
publisher's signed ledger checkpoint with an inclusion proof of the adapter's ledger entry). The
publisher's workspace Ed25519 key signs ``canonical_json(manifest)``; the package's digest is the
SHA-256 of those bytes, so "same digest twice" means byte-identical manifests.

``verify(manifest, signature)`` is the one verification both sides run: the registry on publish and
for its badge, the client on pull (plus its own trust policy on the key id).
"""

from __future__ import annotations

import base64
import json
import re

from ..canonical import canonical_json, sha256_bytes
from ..errors import IntegrityError
from ..ledger import merkle
from ..ledger.dsse import IN_TOTO, open_envelope, sign_envelope
from ..ledger.log import Checkpoint
from ..ledger.signing import KeyPair, key_id, public_from_b64, verify_signature
from .checks import REQUIRED_DOCUMENTS, REQUIRED_FILES, Refused, check_path, refuse

FORMAT = "finetrace-package/1"
DSSE_TYPE = IN_TOTO
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")  # fullmatch: ASCII only, so no Unicode look-alikes
VERSION_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,31}")
# Licences a buyer may use without an explicit acceptance step (SPDX ids of common open licences).
OPEN_LICENSES = {
    "Apache-2.0",
    "MIT",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "CC-BY-4.0",
    "CC0-1.0",
    "MPL-2.0",
    "ISC",
    "Unlicense",
    "CC-BY-SA-4.0",
    "OpenRAIL-M",
}


def parse_ref(ref: str) -> tuple[str, str, str | None]:
    """``ns/name@version`` (version optional) → parts, or Refused naming what is wrong."""
    body, _, version = ref.partition("@")
    ns, sep, name = body.partition("/")
    if not sep or not NAME_RE.fullmatch(ns) or not NAME_RE.fullmatch(name):
        raise refuse(
            f"bad package reference {ref!r}",
            hint="use namespace/name@version, lower-case letters, digits, '.', '_', '-'",
        )
    if version and not VERSION_RE.fullmatch(version):
        raise refuse(f"bad version {version!r} in {ref!r}", hint="e.g. 1.0.0")
    return ns, name, version or None


def manifest_bytes(manifest: dict) -> bytes:
    return canonical_json(manifest)


def manifest_digest(manifest: dict) -> str:
    return sha256_bytes(manifest_bytes(manifest))


def sign(manifest: dict, keys: KeyPair) -> dict:
    return {"key_id": keys.key_id, "signature": keys.sign(manifest_bytes(manifest))}


def license_needs_acceptance(lic: dict) -> bool:
    return lic.get("id") not in OPEN_LICENSES


# -- DSSE attestations ---------------------------------------------------------------------------
def adapter_files(manifest: dict) -> list[dict]:
    """The adapter folder as the manifest lists it: ``[{"path" (inside adapter/), "size", "digest"}]``."""
    return [
        {"path": f["path"][len("adapter/") :], "size": f["size"], "digest": f["digest"]}
        for f in manifest["files"]
        if f["path"].startswith("adapter/")
    ]


def check_adapter_digest(manifest: dict) -> None:
    """The listed adapter files must be exactly the folder whose digest the publisher signed.

    The folder digest is the finetrace tree digest (``ObjectStore.manifest_bytes``) of path, size and
    digest of every file, so with each object re-hashed on receipt, the stored files *are* that adapter.
    """
    from ..store import ObjectStore

    got = sha256_bytes(ObjectStore.manifest_bytes(adapter_files(manifest)))
    if got != manifest["adapter"].get("digest"):
        raise Refused(
            f"the adapter/ files listed hash to folder digest {got}, not to the signed adapter digest "
            f"{manifest['adapter'].get('digest')}",
            field="manifest.adapter.digest",
            hint="list every file of the adapter folder, unchanged, with its size and digest",
        )


def attestation_subjects(manifest: dict) -> dict[str, str]:
    """The one rule for what an attestation is about: every adapter file, by name inside the folder and
    sha256 (what ``finetrace docs`` writes; the folder digest is derived from exactly these)."""
    return {f["path"]: f["digest"].split(":", 1)[1] for f in adapter_files(manifest)}


def make_attestation(
    keys: KeyPair,
    manifest_files: list[dict],
    predicate: dict,
    predicate_type: str = "https://finetrace.dev/attestation/training/v1",
) -> dict:
    """A DSSE envelope around an in-toto v1 statement about the adapter files (used when audit has none)."""
    subjects = attestation_subjects({"files": manifest_files})
    statement = {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": n, "digest": {"sha256": d}} for n, d in sorted(subjects.items())],
        "predicateType": predicate_type,
        "predicate": predicate,
    }
    return sign_envelope(canonical_json(statement), keys, DSSE_TYPE)


def verify_attestation(envelope: dict, public_key_b64: str, manifest: dict) -> None:
    """The envelope is signed by the publisher's key with type in-toto (``ledger/dsse.py``), its subjects
    are exactly the adapter files of the manifest (``attestation_subjects``), and an adapter digest it
    names is the manifest's."""
    what = "attestation/attestation.dsse.json"
    payload = open_envelope(envelope, public_from_b64(public_key_b64), DSSE_TYPE, what=what)
    try:
        statement = json.loads(payload)
        subjects = {s["name"]: s["digest"]["sha256"] for s in statement.get("subject") or []}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise IntegrityError(f"{what} is not a DSSE envelope of an in-toto statement: {exc}") from None
    want = attestation_subjects(manifest)
    if subjects != want:
        diff = sorted(set(subjects.items()) ^ set(want.items()))
        raise IntegrityError(
            f"attestation/attestation.dsse.json does not attest the adapter files "
            f"(first difference: adapter/{diff[0][0]})"
        )
    pred = statement.get("predicate") if isinstance(statement.get("predicate"), dict) else {}
    named = ((pred.get("buildDefinition") or {}).get("externalParameters") or {}).get("adapter") or pred.get("adapter")
    if named is not None and named != manifest["adapter"].get("digest"):
        raise IntegrityError(
            f"attestation/attestation.dsse.json is about adapter {named}, the manifest about "
            f"{manifest['adapter'].get('digest')}"
        )


# -- the manifest --------------------------------------------------------------------------------
def check_shape(manifest: dict) -> None:
    """Structural checks of a manifest (before any object is received)."""
    if manifest.get("format") != FORMAT:
        raise refuse(f"manifest format {manifest.get('format')!r} is not {FORMAT}")
    for key in ("package", "files", "adapter", "base_model", "license", "publisher"):
        if not isinstance(manifest.get(key), dict if key != "files" else list):
            raise Refused("missing or malformed", field=f"manifest.{key}")
    pkg = manifest["package"]
    parse_ref(f"{pkg.get('namespace')}/{pkg.get('name')}@{pkg.get('version')}")
    seen = set()
    for f in manifest["files"]:
        if not isinstance(f, dict) or not isinstance(f.get("path"), str):
            raise Refused("each file needs path, size, digest", field="manifest.files")
        check_path(f["path"])
        if f["path"] in seen:
            raise refuse(f"file {f['path']!r} listed twice")
        seen.add(f["path"])
        if (
            type(f.get("size")) is not int
            or f["size"] < 0
            or not re.fullmatch(r"sha256:[0-9a-f]{64}", str(f.get("digest")))
        ):
            raise refuse(f"file {f['path']!r}: size must be an integer and digest sha256:<64 hex>")
    missing = [p for p in REQUIRED_FILES if p not in seen]
    if missing:
        raise refuse(
            f"the package lacks {', '.join(missing)}", hint="an adapter needs its PEFT files and finetrace_adapter.json"
        )
    lic = manifest["license"]
    if not isinstance(lic.get("id"), str) or (lic["id"] == "custom" and not str(lic.get("terms", "")).strip()):
        raise Refused("needs an SPDX id, or id 'custom' with the terms a buyer must accept", field="manifest.license")
    base = manifest["base_model"]
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", str(base.get("digest"))):
        raise Refused("must be the sha256 digest of the base model", field="manifest.base_model.digest")
    _check_types(manifest)
    check_adapter_digest(manifest)


_OPTIONAL = {
    "description": str,
    "domain": list,
    "task": list,
    "metrics": dict,
    "base_metrics": dict,
    "bias": dict,
    "gate": dict,
    "lineage": dict,
    "primary_metric": (str, type(None)),
}


def _check_types(manifest: dict) -> None:
    """Every optional field has its type, so nothing later trips over a list where a dict belongs."""
    for key, typ in _OPTIONAL.items():
        if key in manifest and not isinstance(manifest[key], typ):
            raise Refused(
                f"must be a {getattr(typ, '__name__', 'string or null')}, not {type(manifest[key]).__name__}",
                field=f"manifest.{key}",
            )
    for key in ("domain", "task"):
        if not all(isinstance(v, str) and len(v) <= 64 for v in manifest.get(key) or []):
            raise Refused("must be a list of short strings", field=f"manifest.{key}")
    for key in ("metrics", "base_metrics"):
        if not all(isinstance(k, str) for k in manifest.get(key) or {}):
            raise Refused("must map metric names to numbers", field=f"manifest.{key}")
    if not isinstance(manifest["adapter"].get("digest"), str):
        raise Refused("must be the adapter folder's sha256 digest", field="manifest.adapter.digest")
    for key in ("name",):
        if not isinstance(manifest["base_model"].get(key, ""), str):
            raise Refused("must be a string", field=f"manifest.base_model.{key}")
    if not isinstance(manifest["base_model"].get("shapes", {}), dict):
        raise Refused("must map tensor names to shapes", field="manifest.base_model.shapes")


def documents_present(manifest: dict) -> list[str]:
    """Required document kinds that the package lacks."""
    kinds = {
        f["path"].split("/", 1)[1].rsplit(".", 1)[0] for f in manifest["files"] if f["path"].startswith("documents/")
    }
    return [k for k in REQUIRED_DOCUMENTS if k not in kinds]


def verify(manifest: dict, signature: dict) -> dict:
    """Verify the signature, the publisher checkpoint and the adapter's inclusion in it.

    Raises IntegrityError on a bad signature (naming which). Returns the facts the badge uses:
    ``{"key_id", "signature", "checkpoint", "inclusion"}`` (booleans besides key_id).
    """
    pubd = manifest["publisher"]
    try:
        pub = public_from_b64(pubd["public_key"])
    except (KeyError, ValueError, TypeError):
        raise IntegrityError("manifest.publisher.public_key is not an Ed25519 public key") from None
    kid = key_id(pub)
    if signature.get("key_id") != kid:
        raise IntegrityError(f"signature key id {signature.get('key_id')} is not the publisher key {kid}")
    verify_signature(pub, manifest_bytes(manifest), str(signature.get("signature", "")), "the package manifest")
    facts = {"key_id": kid, "signature": True, "checkpoint": False, "inclusion": False}
    cp = pubd.get("checkpoint")
    if isinstance(cp, dict):
        try:
            c = Checkpoint(int(cp["size"]), str(cp["root"]), str(cp["time"]), str(cp["key_id"]), str(cp["signature"]))
            if c.key_id == kid:
                verify_signature(pub, c.message(), c.signature, "the publisher checkpoint")
                facts["checkpoint"] = True
                entry = pubd.get("entry") or {}
                body = base64.b64decode(entry.get("body", ""))
                proof = [bytes.fromhex(h) for h in entry.get("proof", [])]
                doc = json.loads(body) if body else {}
                if (
                    doc.get("type") == "artifact.added"
                    and doc.get("data", {}).get("digest") == manifest["adapter"].get("digest")
                    and merkle.verify_inclusion(
                        int(entry.get("seq", -1)), c.size, merkle.leaf_hash(body), proof, bytes.fromhex(c.root)
                    )
                ):
                    facts["inclusion"] = True
        except (KeyError, ValueError, TypeError, IntegrityError):
            pass
    return facts
