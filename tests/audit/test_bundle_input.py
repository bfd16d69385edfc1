"""verify_bundle's input checks are real errors, not asserts: they hold under ``python -O`` too."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

SCRIPT = """
import json, sys
from finetrace.audit.bundle_verify import verify_bundle
r = verify_bundle(sys.argv[1])
print(json.dumps({"ok": r.ok, "problems": r.problems}))
"""


def test_a_non_ed25519_key_is_refused_even_under_python_O(tmp_path):
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    bundle = tmp_path / "b.zip"
    with zipfile.ZipFile(bundle, "w") as z:
        z.writestr("bundle.json", "{}")
        z.writestr("bundle.json.sig", "AAAA")
        z.writestr("public_key.pem", pem)
        z.writestr("checkpoint.json", "{}")
    for flags in ([], ["-O"]):
        out = subprocess.run(
            [sys.executable, *flags, "-c", SCRIPT, str(bundle)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        assert not got["ok"] and got["problems"] == ["public key (public_key.pem) is not an Ed25519 PEM key"], got
