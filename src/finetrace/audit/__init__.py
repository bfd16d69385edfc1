"""The audit stage: documents, attestations, approvals, reproduction and offline-verifiable bundles.

Public entry points (the CLI and tests call only these):

    generate_documents(ws, adapter_ref, intended_use=None, formats=("md", "html")) -> list[Artifact]
    approve(ws, adapter_ref, by, note, report_ref=None) -> Entry          # `finetrace approve`
    reproduce(ws, run_id) -> ReproduceResult                              # `finetrace reproduce`
    export_bundle(ws, adapter_ref, out) -> Path                           # `finetrace export`
    verify_bundle(path, expected_key_id=None) -> BundleReport             # `finetrace verify X.zip`

File structure::

    facts.py          everything the ledger knows about one adapter; the intended-use file
    templates/        Jinja2 Markdown templates (model card, Annex IV, AB 2013, EU summary) + HTML page
    render.py         Markdown -> HTML (markdown-it), HTML -> PDF / screenshots (headless Chromium)
    mlbom.py          CycloneDX 1.6 ML-BOM and its schema validation
    attest.py         in-toto Statement v1 + SLSA provenance v1 in a DSSE envelope (Ed25519)
    documents.py      generate_documents: render, store as `document` artifacts, one `document` run
    approvals.py      signed, dated approvals (`approval` ledger events)
    reproduction.py   re-execute a train/evaluate run by digest, compare outputs bit for bit
    bundle.py         export_bundle: adapter + documents + lineage entries + proofs + checkpoint + key
    bundle_verify.py  verify_bundle: every signature, digest and proof, with no workspace

Imports are lazy so that ``verify_bundle`` runs on a bare install without loading torch.
"""

from __future__ import annotations

_ENTRY_POINTS = {
    "generate_documents": "documents",
    "latest_documents": "documents",
    "approve": "approvals",
    "reproduce": "reproduction",
    "ReproduceResult": "reproduction",
    "export_bundle": "bundle",
    "verify_bundle": "bundle_verify",
    "BundleReport": "bundle_verify",
}

__all__ = sorted(_ENTRY_POINTS)


def __getattr__(name: str):
    if name in _ENTRY_POINTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_ENTRY_POINTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
