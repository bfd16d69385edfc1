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
``PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`` with the workspace key (``ledger/dsse.py``, shared with the marketplace), and ``keyid`` is the
workspace key id. ``verify_envelope`` checks it with nothing but ``cryptography``; tests check it again with securesystemslib's independent DSSE code.
"""

from __future__ import annotations

import base64
import json

from ..canonical import canonical_json
from ..errors import IntegrityError
from ..ledger.dsse import IN_TOTO, open_envelope, sign_envelope
from .facts import Facts

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
PAYLOAD_TYPE = IN_TOTO
BUILD_TYPE = "https://finetrace.dev/train/v1"
BUILDER_ID = "https://finetrace.dev/builder/local"


def _hex(d: str) -> str:
    return d.split(":", 1)[1]


def _deps(prefix: str, ref: str, files: list[dict]) -> list[dict]:
    return [
        {
            "name": f"{prefix}/{f['path']}",
            "uri": f"finetrace:{ref}/{f['path']}",
            "digest": {"sha256": _hex(f["digest"])},
        }
        for f in files
    ]


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
    run_details: dict = {
        "builder": {"id": BUILDER_ID, "version": {"finetrace": facts.finetrace_version}},
        "metadata": {"invocationId": tr.get("id") or "not recorded"},
    }
    if tr.get("started"):
        run_details["metadata"]["startedOn"] = tr["started"]
    if tr.get("ended"):
        run_details["metadata"]["finishedOn"] = tr["ended"]
    if facts.checkpoint:
        run_details["byproducts"] = [
            {
                "name": "ledger-checkpoint",
                "mediaType": "application/json",
                "content": base64.b64encode(canonical_json(facts.checkpoint)).decode(),
            }
        ]
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": f["path"], "digest": {"sha256": _hex(f["digest"])}} for f in ad.get("files") or []],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "config": tr.get("config") or {},
                    "adapter": ad["digest"],
                    "adapter_ref": ad["ref"],
                },
                "internalParameters": {"environment": env, "run_kind": tr.get("kind")},
                "resolvedDependencies": deps,
            },
            "runDetails": run_details,
        },
    }


def verify_envelope(envelope: dict, public_key) -> dict:
    """Check the envelope's signature by ``public_key`` and its type; return the decoded in-toto statement."""
    payload = open_envelope(envelope, public_key, PAYLOAD_TYPE, what="the attestation")
    try:
        stmt = json.loads(payload)
    except ValueError:
        raise IntegrityError("the attestation payload is not JSON") from None
    if not isinstance(stmt, dict) or stmt.get("_type") != STATEMENT_TYPE or stmt.get("predicateType") != PREDICATE_TYPE:
        raise IntegrityError("the attestation is not an in-toto v1 statement with a SLSA v1 predicate")
    return stmt


def attest(facts: Facts, keys) -> dict:
    """The signed envelope for ``facts``."""
    return sign_envelope(canonical_json(statement(facts)), keys)
