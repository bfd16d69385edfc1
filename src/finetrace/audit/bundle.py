"""``finetrace export``: an audit bundle (.zip) of one adapter that verifies with no workspace.

Layout::

    bundle.json              what is in the bundle: adapter, documents, entries, checkpoint, and the
                             SHA-256 of every other file (signed: bundle.json.sig)
    bundle.json.sig          Ed25519 signature (base64) of bundle.json by the workspace key
    public_key.pem           the workspace public key (its key id is printed by verify; pin it)
    checkpoint.json          the signed ledger checkpoint every proof is against
    ledger/consistency.json  RFC 6962 consistency proofs from every older stored checkpoint to it, so
                             ``verify BUNDLE --checkpoint OLD.json`` checks the log extends an auditor's copy
    adapter/...              the adapter folder (PEFT files + finetrace_adapter.json + metrics)
    documents/<slug>/...     the latest documents (model card, Annex IV, AB 2013, EU summary, ML-BOM,
                             attestation.dsse.json)
    ledger/entries/<seq>.json    the raw ledger entries of the adapter's whole lineage (base model,
                                 datasets, sources, train run, evaluations, documents, gate verdicts,
                                 overrides, approvals, and entry 0 that records the public key)
    ledger/proofs/<seq>.json     RFC 6962 inclusion proof of each entry in the checkpoint's tree
    README.txt               how to verify

``verify_bundle`` (``bundle_verify``) re-checks all of it with the bundle alone.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from ..atomic import atomic_writer
from ..canonical import canonical_json, sha256_bytes
from ..errors import InputError
from ..ledger import lineage
from ..ledger.log import now
from ..workspace import Workspace

FORMAT = "finetrace-bundle/1"
DOWNSTREAM_KINDS = ("evaluate", "document", "reproduce")
EVENT_TYPES = ("gate.verdict", "gate.override", "approval")

README = """\
finetrace audit bundle of {ref} ({digest})

Verify it anywhere finetrace is installed, with no workspace:

    finetrace verify {name}

It checks the signature of bundle.json and of the ledger checkpoint (public_key.pem, key id {key_id}:
compare it with the key id you were given, or pin it: --key {key_id}, or --checkpoint FILE with a checkpoint
you kept), the inclusion proof of every ledger entry against the
checkpoint's Merkle root, the digest of every adapter and document file against the signed ledger
entries, the DSSE attestation and every approval signature.
"""


def lineage_entries(ws: Workspace, adapter_digest: str) -> list[int]:
    """Sequence numbers of every ledger entry about the adapter's lineage (see the module docstring)."""
    led = ws.ledger
    roots = [adapter_digest]
    runs: set[str] = set()
    for rid in led.consumers(adapter_digest):
        r = led.get_run(rid)
        if r.kind in DOWNSTREAM_KINDS:
            runs.add(rid)
            roots += r.outputs
    artifacts: set[str] = set()
    for d in roots:
        g = lineage(led, d, "up")
        artifacts |= {a for a, v in g["artifacts"].items() if v["kind"] != "unrecorded"}
        runs |= set(g["runs"])
    seqs = []
    for e in led.entries():
        d = e.data
        if (
            e.type == "workspace.created"
            or (e.type == "artifact.added" and d.get("digest") in artifacts)
            or (e.type in ("run.started", "run.finished") and d.get("id") in runs)
            or (e.type == "run.output" and d.get("run_id") in runs)
            or (e.type in EVENT_TYPES and d.get("adapter") == adapter_digest)
        ):
            seqs.append(e.seq)
    return seqs


def export_bundle(ws: Workspace, adapter_ref: str, out: str | Path, intended_use=None) -> Path:
    """Write the audit bundle of ``adapter_ref`` to ``out`` (.zip) and record an ``export`` run.

    Documents are (re)generated first when the adapter has none, when ``intended_use`` is given, or when
    an approval, gate verdict or evaluation is newer than them (with the previous run's intended use,
    formats and OMS choice), so the bundle's documents always state the latest recorded facts.
    """
    from .documents import generate_documents, latest_documents

    out = Path(out)
    if out.suffix != ".zip":
        raise InputError(f"the bundle must be a .zip file, not {out.name}", field="-o")
    led = ws.ledger
    adapter = led.resolve(adapter_ref)
    if adapter.kind not in ("adapter", "model"):
        raise InputError(f"{adapter_ref} is a {adapter.kind}, not an adapter")
    docs = latest_documents(ws, adapter.digest)
    if "attestation" not in docs or intended_use is not None or _stale(ws, adapter.digest, docs):
        formats, previous, oms = _previous_settings(ws, docs)
        generate_documents(
            ws,
            adapter.digest,
            intended_use=intended_use if intended_use is not None else previous,
            formats=formats,
            oms=oms,
        )
        docs = latest_documents(ws, adapter.digest)

    cp = ws.checkpoint()
    seqs = lineage_entries(ws, adapter.digest)
    seqs = [s for s in seqs if s < cp.size]
    files: dict[str, bytes] = {}
    for e in ws.store.tree(adapter.digest):
        files[f"adapter/{e.path}"] = ws.store.read_bytes(e.digest)
    doc_index = {}
    for kind, art in sorted(docs.items()):
        slug = _slug(art)
        for e in ws.store.tree(art.digest):
            files[f"documents/{slug}/{e.path}"] = ws.store.read_bytes(e.digest)
        doc_index[slug] = {"document": kind, "digest": art.digest, "ref": art.ref}
    leaves = led.leaves(cp.size)
    from ..ledger import merkle

    for s in seqs:
        raw = led.raw_entry(s)
        files[f"ledger/entries/{s}.json"] = raw
        proof = merkle.inclusion_proof(s, leaves)
        files[f"ledger/proofs/{s}.json"] = canonical_json(
            {"seq": s, "size": cp.size, "leaf": leaves[s].hex(), "proof": [p.hex() for p in proof]}
        )
    older = sorted({c.size for c in led.checkpoints() if 0 < c.size < cp.size})
    files["ledger/consistency.json"] = canonical_json(
        {
            "format": "finetrace-consistency/1",
            "size": cp.size,
            "proofs": {str(m): [h.hex() for h in p] for m, p in merkle.consistency_proofs(older, leaves).items()},
        }
    )
    files["checkpoint.json"] = canonical_json(cp.to_dict())
    pem = (ws.root / "keys" / "workspace.pub").read_bytes()
    files["public_key.pem"] = pem
    files["README.txt"] = README.format(
        ref=adapter.ref, digest=adapter.digest, name=out.name, key_id=ws.keys.key_id
    ).encode()
    manifest = {
        "format": FORMAT,
        "created": now(),
        "adapter": {"digest": adapter.digest, "ref": adapter.ref},
        "documents": doc_index,
        "entries": seqs,
        "checkpoint": cp.to_dict(),
        "key_id": ws.keys.key_id,
        "files": {p: sha256_bytes(b) for p, b in sorted(files.items())},
    }
    mbytes = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
    files["bundle.json"] = mbytes
    files["bundle.json.sig"] = ws.keys.sign(mbytes).encode()

    with led.run(
        "export",
        {"adapter": adapter.digest, "out": str(out), "entries": len(seqs), "checkpoint_size": cp.size},
        inputs=[adapter.digest] + [d["digest"] for d in doc_index.values()],
    ) as run:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(out) as fh:
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as z:
                for path in sorted(files):
                    info = zipfile.ZipInfo(path, date_time=(1980, 1, 1, 0, 0, 0))
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.external_attr = 0o644 << 16
                    z.writestr(info, files[path])
        digest = ws.store.put_file(out)
        run.output(
            "bundle",
            digest,
            metadata={"adapter": adapter.digest, "file": out.name, "checkpoint_size": cp.size, "entries": len(seqs)},
        )
        run.metrics.update({"files": len(files), "bytes": out.stat().st_size, "entries": len(seqs)})
    return out


def _stale(ws: Workspace, adapter_digest: str, docs: dict) -> bool:
    """True if an approval, gate verdict/override or evaluation of the adapter is newer than its documents."""
    newest_doc = max(a.created for a in docs.values())
    for e in ws.ledger.entries(start=0):
        if e.time <= newest_doc:
            continue
        if e.type in EVENT_TYPES and e.data.get("adapter") == adapter_digest:
            return True
        if (
            e.type == "artifact.added"
            and e.data.get("kind") == "eval_report"
            and adapter_digest in ((e.data.get("metadata") or {}).get("adapters") or [])
        ):
            return True
    return False


def _previous_settings(ws: Workspace, docs: dict) -> tuple[tuple, dict | None, bool]:
    """Formats, intended-use facts and OMS choice of the latest document run (to regenerate them)."""
    if not docs:
        return ("md", "html"), None, False
    run = ws.ledger.get_run(max(docs.values(), key=lambda a: a.created).run_id)
    digest = run.config.get("intended_use")
    intended = json.loads(ws.store.read_bytes(digest)) if digest and ws.store.has(digest) else None
    return tuple(run.config.get("formats") or ("md", "html")), intended, bool(run.config.get("oms"))


def _slug(art) -> str:
    """The document folder name inside a bundle: its type's slug (model-card, annex-iv, ...)."""
    from .documents import DOC_TYPES

    kind = (art.metadata or {}).get("document", "")
    return DOC_TYPES[kind][0] if kind in DOC_TYPES else kind.replace("_", "-") or art.digest[7:19]
