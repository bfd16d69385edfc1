"""Optional: sign the adapter folder in the OpenSSF model-signing (OMS) format, in key mode.

``model-signing`` (``pip install model-signing pyopenssl``) signs a model folder as a Sigstore bundle
holding a DSSE envelope over an in-toto statement of every file's digest, so that others verify with
their own tools (``model_signing verify key --public_key oms_public_key.pem``). Its key mode takes
elliptic-curve keys only, not the workspace's Ed25519 key, so the workspace gets a second key,
``keys/oms-p256.key`` (0600), created on first use. Its public key ships inside the ``oms-signature``
document artifact, which the Ed25519-signed ledger records, so the OMS key is bound to the workspace.
Offline only: no Sigstore/Rekor network calls in key mode.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..atomic import write_bytes
from ..errors import DependencyError, IntegrityError
from ..workspace import Workspace

KEY_FILE = "oms-p256.key"
SIGNATURE = "model.sig"
PUBLIC = "oms_public_key.pem"


def available() -> bool:
    """Whether model-signing and its pyOpenSSL dependency are installed (checked without importing)."""
    from importlib.util import find_spec

    return find_spec("model_signing") is not None and find_spec("OpenSSL") is not None


def _require():
    try:
        import model_signing
    except Exception as exc:  # ImportError, or a missing optional dependency such as pyOpenSSL
        raise DependencyError(
            f"OpenSSF model signing needs the model-signing package ({exc})", hint="pip install model-signing pyopenssl"
        ) from None
    return model_signing


def key_paths(ws: Workspace) -> tuple[Path, bytes]:
    """The workspace's P-256 key file (created on first use) and its public key PEM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = ws.root / "keys" / KEY_FILE
    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        write_bytes(
            path,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            mode=0o600,
        )
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return path, pub


def sign_folder(ws: Workspace, model_dir: Path, out: Path) -> None:
    """Write ``out/model.sig`` (OMS Sigstore bundle) and ``out/oms_public_key.pem`` for ``model_dir``."""
    ms = _require()
    key, pub = key_paths(ws)
    out.mkdir(parents=True, exist_ok=True)
    ms.signing.Config().use_elliptic_key_signer(private_key=key).set_hashing_config(
        ms.hashing.Config().set_ignored_paths(paths=[model_dir / ".finetrace-complete"])
    ).sign(model_dir, out / SIGNATURE)
    write_bytes(out / PUBLIC, pub)


def verify_folder(model_dir: Path, signature: Path, public_key: Path) -> None:
    """Verify with model-signing's own verifier; IntegrityError naming the folder if it fails."""
    ms = _require()
    try:
        ms.verifying.Config().use_elliptic_key_verifier(public_key=public_key).set_hashing_config(
            ms.hashing.Config().set_ignored_paths(paths=[Path(model_dir) / ".finetrace-complete"])
        ).verify(model_dir, signature)
    except Exception as exc:
        raise IntegrityError(f"the OpenSSF model signature of {model_dir} does not verify: {exc}") from None


def sign_adapter(ws: Workspace, adapter_digest: str, out: Path) -> None:
    """Sign a recorded adapter's files (copied to a clean folder first, so only its files are covered)."""
    import shutil

    src = ws.store.materialize(adapter_digest)
    with tempfile.TemporaryDirectory(dir=ws.cache, prefix=".oms-") as tmp:
        clean = Path(tmp) / "adapter"
        clean.mkdir()
        for e in ws.store.tree(adapter_digest):
            (clean / e.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / e.path, clean / e.path)
        sign_folder(ws, clean, out)
