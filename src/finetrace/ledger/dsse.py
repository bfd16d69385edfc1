"""DSSE v1 envelopes (https://github.com/secure-systems-lab/dsse), Ed25519: the one implementation.

Audit attestations (``audit/attest.py``) and marketplace packages (``market/package.py``) both sign and
verify through here, so both refuse the same things: a malformed envelope, no signature by the key, and
a ``payloadType`` other than the one expected (a signature over another type is not a signature over
this one).

    >>> env = sign_envelope(b'{"_type": ...}', keys)              # {"payloadType", "payload", "signatures"}
    >>> payload = open_envelope(env, public_key, what="the attestation")   # the verified bytes

The signature is over ``PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body``;
``keyid`` is the workspace key id (``sha256:`` of the raw public key).
"""

from __future__ import annotations

import base64

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..errors import IntegrityError
from .signing import key_id

IN_TOTO = "application/vnd.in-toto+json"


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(t), t, len(body), body)


def sign_envelope(payload: bytes, keys, payload_type: str = IN_TOTO) -> dict:
    """A DSSE envelope ``{"payloadType", "payload" (base64), "signatures": [{"keyid", "sig"}]}``."""
    return {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [{"keyid": keys.key_id, "sig": keys.sign(pae(payload_type, payload))}],
    }


def open_envelope(
    envelope: dict, public_key: Ed25519PublicKey, payload_type: str = IN_TOTO, what: str = "the DSSE envelope"
) -> bytes:
    """The payload of ``envelope`` once a signature by ``public_key`` verifies and its type is
    ``payload_type``; IntegrityError naming ``what`` otherwise.

    A signature whose ``keyid`` names another key is skipped (the DSSE keyid is a hint; empty is allowed).
    """
    try:
        payload = base64.b64decode(envelope["payload"], validate=True)
        ptype = envelope["payloadType"]
        sigs = envelope["signatures"]
        if not isinstance(ptype, str) or not isinstance(sigs, list):
            raise TypeError("payloadType must be text and signatures a list")
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"{what} is not a DSSE envelope: {exc}") from None
    kid = key_id(public_key)
    good = False
    for s in sigs:
        if not isinstance(s, dict) or s.get("keyid") not in (kid, None, ""):
            continue
        try:
            public_key.verify(base64.b64decode(s["sig"]), pae(ptype, payload))
            good = True
            break
        except (InvalidSignature, ValueError, KeyError, TypeError):
            continue
    if not good:
        raise IntegrityError(f"{what}: no DSSE signature verifies with key {kid}")
    if ptype != payload_type:
        raise IntegrityError(
            f"{what} has payload type {ptype!r}, expected {payload_type}",
            hint="the signature covers a different kind of document",
        )
    return payload
