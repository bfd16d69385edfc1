"""``finetrace docs``: generate an adapter's documents from the ledger and record them as artifacts.

    generate_documents(ws, "routing-lora@1", intended_use="intended.yaml", formats=("md", "html", "pdf"))

One ``document`` run reads the adapter, its evaluation reports, datasets and base model (and the
intended-use file, stored by digest) and writes one ``document`` artifact (a folder) per document:

    <adapter>-model-card       README.md (Hugging Face model card with YAML front matter), README.html
    <adapter>-annex-iv         annex_iv.md, annex_iv.html (+ annex_iv.pdf)      EU AI Act Annex IV
    <adapter>-ab2013           ab2013.md, ab2013.html (+ .pdf)                  California AB 2013
    <adapter>-eu-training-summary  eu_training_summary.md/.html (+ .pdf)        EU Art. 53(1)(d)
    <adapter>-mlbom            mlbom.cdx.json                                  CycloneDX 1.6 ML-BOM
    <adapter>-attestation      attestation.dsse.json                           in-toto + SLSA, DSSE
    <adapter>-oms-signature    model.sig, oms_public_key.pem (optional)        OpenSSF model signing

Every artifact's metadata names the adapter, the document type and ``intended_use_missing`` (the
required intended-use keys not given): publishing refuses an adapter whose latest documents have it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml

from ..atomic import write_bytes, write_text
from ..canonical import canonical_json
from ..errors import InputError
from ..ledger import Artifact
from ..workspace import Workspace
from . import attest as attest_mod
from . import mlbom, render
from .facts import REQUIRED_INTENDED, Facts, gather, load_intended

FORMATS = ("md", "html", "pdf")
DOC_TYPES = {
    "model_card": ("model-card", "README", "model_card.md.jinja", "Model card"),
    "annex_iv": ("annex-iv", "annex_iv", "annex_iv.md.jinja", "EU AI Act Annex IV technical documentation"),
    "ab2013": ("ab2013", "ab2013", "ab2013.md.jinja", "California AB 2013 training-data disclosure"),
    "eu_training_summary": (
        "eu-training-summary",
        "eu_training_summary",
        "eu_training_summary.md.jinja",
        "EU training-content summary",
    ),
}
DATASHEET_FIELDS = {
    "source": "where the data comes from",
    "owner": "who is responsible for it",
    "license": "its licence",
    "collection_method": "how it was collected",
    "collection_period": "when it was collected",
    "annotation_process": "how labels were produced",
    "personal_data": "whether it has personal data",
    "copyrighted": "whether it has copyrighted material",
    "purchased_or_licensed": "whether it was bought",
    "synthetic": "whether a model generated it",
    "intended_use": "what it is meant for",
}
ANNEX_IV_HEADINGS = [
    "1. General description of the AI system",
    "2. Detailed description of the elements of the AI system and of the process for its development",
    "3. Monitoring, functioning and control",
    "4. Appropriateness of the performance metrics",
    "5. Risk management system",
    "6. Relevant changes made through the lifecycle",
    "7. Harmonised standards applied",
    "8. EU declaration of conformity",
    "9. Post-market monitoring system",
]


def front_matter(facts: Facts) -> str:
    """Hugging Face model-card metadata (YAML between ``---`` lines)."""
    ad, base = facts.adapter, facts.base
    source = ((base or {}).get("metadata") or {}).get("source") or {}
    hub_id = source.get("repo_id") if isinstance(source, dict) else None
    meta: dict = {
        # the Hub id when the base came from the Hub, else the workspace name (its digest is under finetrace:)
        "base_model": hub_id or (base or {}).get("name") or (base or {}).get("ref") or "not provided",
        "base_model_relation": "adapter",
        "library_name": "peft",
        "license": str(facts.intended.get("license") or "other"),
        "datasets": [d.get("ref") for d in facts.datasets],
        "tags": [
            "finetrace",
            str(ad["metadata"].get("method", "lora")),
            "peft",
            *[str(t) for t in (facts.intended.get("tags") or [])],
        ],
        "pipeline_tag": "text-generation",
    }
    results = []
    for ev in facts.evaluations:
        sub = ev.get("subject") or {}
        ds = (ev.get("report") or {}).get("dataset") or {}
        ms = [{"type": k, "name": k, "value": v.get("value")} for k, v in (sub.get("metrics") or {}).items()]
        if ms:
            results.append(
                {
                    "task": {
                        "type": "text-classification"
                        if ev["report"].get("task") == "classification"
                        else "text-generation"
                    },
                    "dataset": {
                        "name": ds.get("ref", "?"),
                        "type": (ds.get("ref") or "?").split("@")[0],
                        "split": ds.get("split", "?"),
                        "revision": ds.get("digest", "?"),
                    },
                    "metrics": ms,
                }
            )
    if results:
        meta["model-index"] = [{"name": ad.get("name") or ad["ref"], "results": results}]
    meta["finetrace"] = {
        "adapter": ad["digest"],
        "base_model": (base or {}).get("digest"),
        "intended_use_missing": facts.intended_use_missing,
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def context(facts: Facts) -> dict:
    ctx = facts.to_dict()
    missing = facts.intended_use_missing
    ctx["intended_warning"] = (
        f"> **Intended use and limitations were not provided** (missing: {', '.join(missing)}). This document "
        "is incomplete and publishing will refuse this adapter until `finetrace docs --intended-use FILE.yaml` "
        "is run with them.\n"
        if missing
        else ""
    )
    ctx["front_matter"] = front_matter(facts)
    ctx["datasheet_fields"] = DATASHEET_FIELDS
    return ctx


def render_all(facts: Facts, out: Path, formats=("md", "html")) -> dict[str, Path]:
    """Write every document for ``facts`` under ``out/<doc>/``; return {doc_type: folder}."""
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise InputError(f"unknown document format {bad[0]!r}", field="--format", hint=f"one of {', '.join(FORMATS)}")
    ctx = context(facts)
    folders: dict[str, Path] = {}
    for doc, (slug, stem, template, title) in DOC_TYPES.items():
        folder = out / slug
        folder.mkdir(parents=True, exist_ok=True)
        md = render.render_markdown(template, ctx)
        write_text(folder / f"{stem}.md", md)  # the model card is always README.md (what the Hub reads)
        if "html" in formats or "pdf" in formats:
            html = render.markdown_to_html(md, f"{title}: {facts.adapter['ref']}", ctx)
            write_text(folder / f"{stem}.html", html)
            if "pdf" in formats:
                render.html_to_pdf(folder / f"{stem}.html", folder / f"{stem}.pdf")
            if "html" not in formats:
                (folder / f"{stem}.html").unlink()
        folders[doc] = folder
    bom = mlbom.build(facts)  # schema-checked by the tests (mlbom.validate: importing jsonschema takes seconds)
    folder = out / "mlbom"
    folder.mkdir(parents=True, exist_ok=True)
    write_bytes(folder / "mlbom.cdx.json", (json.dumps(bom, indent=2) + "\n").encode())
    folders["mlbom"] = folder
    return folders


def generate_documents(
    ws: Workspace,
    adapter_ref: str,
    intended_use: str | Path | dict | None = None,
    formats=("md", "html"),
    out: str | Path | None = None,
    oms: bool = False,
) -> list[Artifact]:
    """Generate and record every document of ``adapter_ref``; return the ``document`` artifacts.

    ``intended_use``: a YAML file (or a dict) with at least ``intended_use`` and ``limitations``; without
    them the documents say so and carry ``intended_use_missing``. ``out``: also copy the files there.
    ``oms``: also sign the adapter folder in the OpenSSF model-signing format (``oms.py``; needs the
    ``model-signing`` package), recorded as the ``oms-signature`` document.
    Raises NotFoundError for an unknown adapter, InputError/ConfigError for a bad intended-use file,
    DependencyError for ``pdf`` without Chromium.
    """
    source = None
    if isinstance(intended_use, dict):
        intended = dict(intended_use)
    else:
        intended = load_intended(intended_use)
        source = str(intended_use) if intended_use else None
    facts = gather(ws, adapter_ref, intended, source)
    ad = facts.adapter
    base_name = ad.get("name") or ad["digest"].split(":", 1)[1][:12]
    inputs = [ad["digest"]] + [e["digest"] for e in facts.evaluations] + [d["digest"] for d in facts.datasets]
    if facts.base:
        inputs.append(facts.base["digest"])
    intended_digest = ws.store.put_bytes(canonical_json(intended)) if intended else None
    if intended_digest:
        inputs.append(intended_digest)
    config = {
        "adapter": ad["digest"],
        "formats": list(formats),
        "intended_use": intended_digest,
        "oms": oms,
        "intended_use_file": source,
        "required_intended": list(REQUIRED_INTENDED),
    }
    arts: list[Artifact] = []
    ws.cache.mkdir(parents=True, exist_ok=True)
    with (
        ws.ledger.run("document", config, inputs=inputs) as run,
        tempfile.TemporaryDirectory(dir=ws.cache, prefix=".docs-") as tmp,
    ):
        folders = render_all(facts, Path(tmp), formats)
        env_folder = Path(tmp) / "attestation"
        env_folder.mkdir()
        envelope = attest_mod.attest(facts, ws.keys)
        write_bytes(env_folder / "attestation.dsse.json", (json.dumps(envelope, indent=2) + "\n").encode())
        folders["attestation"] = env_folder
        if oms:
            from . import oms as oms_mod

            oms_mod.sign_adapter(ws, ad["digest"], Path(tmp) / "oms-signature")
            folders["oms_signature"] = Path(tmp) / "oms-signature"
        for doc, folder in folders.items():
            digest = ws.store.put_dir(folder)
            slug = folder.name
            arts.append(
                run.output(
                    "document",
                    digest,
                    name=f"{base_name}-{slug}",
                    metadata={
                        "document": doc,
                        "adapter": ad["digest"],
                        "adapter_ref": ad["ref"],
                        "files": sorted(p.name for p in folder.iterdir()),
                        "intended_use_missing": facts.intended_use_missing,
                    },
                )
            )
        run.metrics.update(
            {
                "documents": len(arts),
                "intended_use_missing": facts.intended_use_missing,
                "evaluations": len(facts.evaluations),
                "datasets": len(facts.datasets),
            }
        )
        if out is not None:
            dest = Path(out)
            dest.mkdir(parents=True, exist_ok=True)
            for folder in folders.values():
                shutil.copytree(folder, dest / folder.name, dirs_exist_ok=True)
    return arts


def latest_documents(ws: Workspace, adapter_digest: str) -> dict[str, Artifact]:
    """The most recent ``document`` artifact of each type for an adapter (by ledger order)."""
    out: dict[str, Artifact] = {}
    for a in ws.ledger.artifacts("document"):
        if (a.metadata or {}).get("adapter") == adapter_digest:
            out[a.metadata.get("document", a.ref)] = a
    return out
