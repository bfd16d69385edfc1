"""The one DSSE implementation (ledger/dsse.py) as both callers use it: audit attestations and market packages."""

from __future__ import annotations

import base64
import json
import re

import pytest

from finetrace.audit.attest import PREDICATE_TYPE, STATEMENT_TYPE, verify_envelope
from finetrace.canonical import canonical_json
from finetrace.errors import IntegrityError
from finetrace.ledger.dsse import IN_TOTO, open_envelope, pae, sign_envelope
from finetrace.ledger.signing import KeyPair, public_to_b64
from finetrace.market.package import make_attestation, verify_attestation

FILES = [{"path": "adapter/adapter_model.safetensors", "size": 3, "digest": "sha256:" + "ab" * 32}]
MANIFEST = {"files": FILES, "adapter": {"digest": "sha256:" + "cd" * 32}}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return KeyPair.create(tmp_path_factory.mktemp("keys"))


def _retyped(envelope: dict, keys: KeyPair, payload_type: str) -> dict:
    """The same payload, validly signed by the same key, under another payloadType."""
    return sign_envelope(base64.b64decode(envelope["payload"]), keys, payload_type)


def test_pae_is_the_dsse_v1_encoding():
    assert pae("t", b"ab") == b"DSSEv1 1 t 2 ab"
    assert pae("é", b"") == b"DSSEv1 2 \xc3\xa9 0 "


def test_audit_path_refuses_a_wrong_payload_type(keys):
    stmt = {"_type": STATEMENT_TYPE, "predicateType": PREDICATE_TYPE, "subject": [], "predicate": {}}
    env = sign_envelope(canonical_json(stmt), keys)
    assert verify_envelope(env, keys.public) == stmt
    bad = _retyped(env, keys, "application/json")
    assert open_envelope(bad, keys.public, "application/json") == canonical_json(stmt)  # the signature is good
    with pytest.raises(IntegrityError, match=re.escape(f"payload type 'application/json', expected {IN_TOTO}")):
        verify_envelope(bad, keys.public)


def test_market_path_refuses_a_wrong_payload_type(keys):
    env = make_attestation(keys, FILES, {"adapter": MANIFEST["adapter"]["digest"]})
    assert env["payloadType"] == IN_TOTO
    verify_attestation(env, public_to_b64(keys.public), MANIFEST)  # accepted as made
    with pytest.raises(IntegrityError, match="payload type 'text/plain'"):
        verify_attestation(_retyped(env, keys, "text/plain"), public_to_b64(keys.public), MANIFEST)


def test_both_paths_refuse_another_key_and_a_changed_payload(keys, tmp_path):
    other = KeyPair.create(tmp_path)
    env = make_attestation(keys, FILES, {})
    with pytest.raises(IntegrityError, match="no DSSE signature verifies"):
        verify_attestation(env, public_to_b64(other.public), MANIFEST)
    changed = dict(env, payload=base64.b64encode(json.dumps({"x": 1}).encode()).decode())
    for check in (
        lambda e: verify_envelope(e, keys.public),
        lambda e: verify_attestation(e, public_to_b64(keys.public), MANIFEST),
    ):
        with pytest.raises(IntegrityError, match="no DSSE signature verifies"):
            check(changed)
        with pytest.raises(IntegrityError, match="not a DSSE envelope"):
            check({"payload": "%%%", "payloadType": IN_TOTO, "signatures": []})
