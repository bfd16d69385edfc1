"""Provenance attestation: an in-toto Statement v1 with a SLSA Provenance v1 predicate, in a DSSE envelope.

    subject               every file of the adapter folder, by sha256
    predicate.buildDefinition
        buildType             https://finetrace.dev/train/v1
        externalParameters    the training config as recorded (canonical JSON in the ledger)
        internalParameters    the recorded environment (packages, threads, seed, hardware)
        resolvedDependencies  every base-model file, every dataset file (shards, datasheet), the parent
                              adapter's files, and finetrace itself (version + git commit)
    predicate.runDetails  builder id, the train run id and its start/finish times, and the ledger
                          checkpoint it was signed under (byproduct)

The envelope follows DSSE v1: the signature is Ed25519 over
``PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`` with the workspace key, and
``keyid`` is the workspace key id (``sha256:`` of the raw public key). ``verify_envelope`` checks it
with nothing but ``cryptography``; tests check it again with securesystemslib's independent DSSE code.
"""

from __future__ import annotations

import base64
import json

from ..canonical import canonical_json
from ..errors import IntegrityError
from .facts import Facts

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
BUILD_TYPE = "https://finetrace.dev/train/v1"
BUILDER_ID = "https://finetrace.dev/builder/local"


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(t), t, len(body), body)


def _hex(d: str) -> str:
    return d.split(":", 1)[1]


def _deps(prefix: str, ref: str, files: list[dict]) -> list[dict]:
    return [{"name": f"{prefix}/{f['path']}", "uri": f"finetrace:{ref}/{f['path']}",
             "digest": {"sha256": _hex(f["digest"])}} for f in files]


def statement(facts: Facts) -> dict:
    """The in-toto Statement (a dict) for the adapter described by ``facts``."""
    ad, base = facts.adapter, facts.base
    tr = facts.train_run or {}
    env = tr.get("environment") or {}
    deps = []
    if base:
        deps += _deps("base_model", base["ref"], base.get("files") or [])
    for d in facts.datasets:
        deps += _deps(f"dataset:{d.get('ref')}", d.get("ref") or d["digest"], d.get("files") or [])
    for p in facts.parents[:1]:
        from_files = p.get("files") or []
        deps.append({"name": "parent_adapter", "uri": f"finetrace:{p['ref']}", "digest": {"sha256": _hex(p["digest"])}})
        deps += _deps("parent_adapter", p["ref"], from_files)
    fin = {"name": "finetrace", "uri": f"pkg:pypi/finetrace@{facts.finetrace_version}"}
    if env.get("git_commit"):
        fin["digest"] = {"gitCommit": env["git_commit"]}
    deps.append(fin)
    run_details: dict = {"builder": {"id": BUILDER_ID,
                                     "version": {"finetrace": facts.finetrace_version}},
                         "metadata": {"invocationId": tr.get("id") or "not recorded"}}
    if tr.get("started"):
        run_details["metadata"]["startedOn"] = tr["started"]
    if tr.get("ended"):
        run_details["metadata"]["finishedOn"] = tr["ended"]
    if facts.checkpoint:
        run_details["byproducts"] = [{"name": "ledger-checkpoint", "mediaType": "application/json",
                                      "content": base64.b64encode(canonical_json(facts.checkpoint)).decode()}]
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": f["path"], "digest": {"sha256": _hex(f["digest"])}} for f in ad.get("files") or []],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"config": tr.get("config") or {}, "adapter": ad["digest"],
                                       "adapter_ref": ad["ref"]},
                "internalParameters": {"environment": env, "run_kind": tr.get("kind")},
                "resolvedDependencies": deps,
            },
            "runDetails": run_details,
        },
    }


def sign_envelope(payload: bytes, keys, payload_type: str = PAYLOAD_TYPE) -> dict:
    """A DSSE envelope ``{"payloadType", "payload" (base64), "signatures": [{"keyid", "sig"}]}``."""
    sig = keys.sign(pae(payload_type, payload))
    return {"payloadType": payload_type, "payload": base64.b64encode(payload).decode(),
            "signatures": [{"keyid": keys.key_id, "sig": sig}]}


def verify_envelope(envelope: dict, public_key) -> dict:
    """Check the envelope's signature by ``public_key``; return the decoded in-toto statement."""
    from cryptography.exceptions import InvalidSignature

    from ..ledger.signing import key_id

    try:
        payload = base64.b64decode(envelope["payload"], validate=True)
        ptype = envelope["payloadType"]
        sigs = envelope["signatures"]
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"the attestation envelope is malformed: {exc}") from None
    kid = key_id(public_key)
    good = False
    for s in sigs:
        if s.get("keyid") not in (kid, None, ""):
            continue
        try:
            public_key.verify(base64.b64decode(s["sig"]), pae(ptype, payload))
            good = True
        except (InvalidSignature, ValueError, KeyError):
            continue
    if not good:
        raise IntegrityError("the attestation's DSSE signature does not verify with the workspace key "
                             f"{kid}")
    if ptype != PAYLOAD_TYPE:
        raise IntegrityError(f"the attestation has payload type {ptype!r}, expected {PAYLOAD_TYPE}")
    try:
        stmt = json.loads(payload)
    except ValueError:
        raise IntegrityError("the attestation payload is not JSON") from None
    if stmt.get("_type") != STATEMENT_TYPE or stmt.get("predicateType") != PREDICATE_TYPE:
        raise IntegrityError("the attestation is not an in-toto v1 statement with a SLSA v1 predicate")
    return stmt


def attest(facts: Facts, keys) -> dict:
    """The signed envelope for ``facts``."""
    return sign_envelope(canonical_json(statement(facts)), keys)
