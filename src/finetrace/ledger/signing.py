"""Ed25519 keys and signatures (via ``cryptography``) for checkpoints, attestations and approvals.

A workspace has one key pair created at ``finetrace init``: ``keys/workspace.key`` (PKCS#8 PEM, mode
0600) and ``keys/workspace.pub``. A key is named by its *key id*, the SHA-256 of the raw 32-byte public
key, so an auditor can pin it.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..atomic import write_bytes
from ..errors import IntegrityError, WorkspaceError


def raw_public(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(pub: Ed25519PublicKey) -> str:
    return "sha256:" + hashlib.sha256(raw_public(pub)).hexdigest()


def public_from_b64(text: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(text))


def public_to_b64(pub: Ed25519PublicKey) -> str:
    return base64.b64encode(raw_public(pub)).decode()


class KeyPair:
    """The workspace's signing key."""

    def __init__(self, private: Ed25519PrivateKey):
        self.private = private
        self.public = private.public_key()
        self.key_id = key_id(self.public)

    @classmethod
    def create(cls, folder: Path) -> KeyPair:
        priv = Ed25519PrivateKey.generate()
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes(
            folder / "workspace.key",
            priv.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            mode=0o600,
        )
        write_bytes(
            folder / "workspace.pub",
            priv.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        )
        return cls(priv)

    @classmethod
    def load(cls, folder: Path) -> KeyPair:
        path = folder / "workspace.key"
        try:
            priv = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            raise WorkspaceError(
                f"the workspace key {path} is missing",
                hint="restore it from backup; without it nothing new can be signed",
            ) from None
        if not isinstance(priv, Ed25519PrivateKey):
            raise WorkspaceError(f"{path} is not an Ed25519 key")
        return cls(priv)

    def sign(self, message: bytes) -> str:
        return base64.b64encode(self.private.sign(message)).decode()


def verify_signature(pub: Ed25519PublicKey, message: bytes, signature_b64: str, what: str) -> None:
    """Raise IntegrityError naming ``what`` unless ``signature_b64`` signs ``message``."""
    try:
        pub.verify(base64.b64decode(signature_b64), message)
    except (InvalidSignature, ValueError) as exc:
        raise IntegrityError(f"bad signature on {what}") from exc
