"""The Hugging Face Hub layout, both ways: a package as a folder the Hub's own tools upload, and back.

    export_hub(ws, "legal-lora@1", DIR, target="acme/legal-lora@1.0.0") -> dict
    import_hub(ws, DIR, trust_keys=[...]) -> (Artifact, facts)

The folder (what ``huggingface-cli upload`` or ``HfApi.upload_folder`` sends as a model repo)::

    README.md                     the model card with Hub metadata: base_model, base_model_relation: adapter,
                                  datasets, license, tags, model-index (one result per metric)
    adapter_config.json  adapter_model.safetensors  finetrace_adapter.json      the PEFT adapter
    .eval_results/<suite>.yaml    the Hub's eval-results entries (percent, per metric)
    finetrace/manifest.json       the signed package manifest (every file's path, size and digest)
    finetrace/signature.json      the publisher's Ed25519 signature of it
    finetrace/attestation.dsse.json, finetrace/documents/*, finetrace/eval/*     the evidence

``import_hub`` verifies what the folder lets it verify: the manifest signature (and that its key is one
the caller trusts), every file against its signed digest, the attestation, the adapter against the
local base's tensor shapes, and that the rebuilt adapter folder hashes to the signed adapter digest. A
folder without a finetrace manifest (an adapter from the Hub) is recorded with ``verified: false`` and
the list of what could not be checked. Either way a ``pull`` run records the adapter.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml

from ..atomic import write_bytes, write_text
from ..canonical import sha256_file
from ..errors import InputError, IntegrityError, NotFoundError
from ..ledger import Artifact
from ..workspace import Workspace
from . import template_check
from .checks import base_shapes_from_folder, check_adapter, check_file, check_path
from .package import manifest_digest, verify, verify_attestation

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "finetrace_adapter.json")


def hub_path(package_path: str) -> str:
    """Where a package file lives in the Hub folder: the adapter at the top, the evidence under finetrace/."""
    if package_path.startswith("adapter/") and package_path != "adapter/README.md":  # README.md is the card
        return package_path[len("adapter/") :]
    return f"finetrace/{package_path}"


def card_metadata(manifest: dict) -> dict:
    """The Hub metadata (README front matter) of a package manifest."""
    pkg, lic = manifest["package"], manifest["license"]
    lineage = manifest.get("lineage") or {}
    datasets = [d for d in (lineage.get("dataset_ref"), lineage.get("eval_dataset")) if d]
    results = [
        {
            "task": {
                "type": "text-classification" if "classification" in (manifest.get("task") or []) else "text-generation"
            },
            "dataset": {"name": lineage.get("eval_dataset") or "eval", "type": lineage.get("eval_dataset") or "eval"},
            "metrics": [
                {"type": k, "value": v, "name": k, "verified": False}
                for k, v in sorted((manifest.get("metrics") or {}).items())
            ],
        }
    ]
    return {
        "base_model": manifest["base_model"].get("name") or manifest["base_model"]["digest"],
        "base_model_relation": "adapter",
        "library_name": "peft",
        "license": lic["id"].lower() if lic["id"] != "custom" else "other",
        "datasets": datasets,
        "tags": sorted({"finetrace", "lora", *manifest.get("domain", []), *manifest.get("task", [])}),
        "model-index": [{"name": f"{pkg['namespace']}/{pkg['name']}", "results": results}],
        "finetrace": {
            "package": f"{pkg['namespace']}/{pkg['name']}@{pkg['version']}",
            "manifest_digest": manifest_digest(manifest),
            "base_model_digest": manifest["base_model"]["digest"],
            "adapter_digest": manifest["adapter"]["digest"],
        },
    }


def _eval_results(manifest: dict) -> dict[str, list[dict]]:
    lineage = manifest.get("lineage") or {}
    ds = lineage.get("eval_dataset") or "eval"
    entries = [
        {
            "dataset": {"id": ds, "task_id": k},
            "value": round(float(v) * 100, 2),
            "source": {"name": f"finetrace eval report {lineage.get('eval_report', '')}".strip()},
        }
        for k, v in sorted((manifest.get("metrics") or {}).items())
    ]
    return {"finetrace.yaml": entries} if entries else {}


def export_hub(ws: Workspace, adapter_ref: str, folder: str | Path, target: str, **package_options) -> dict:
    """Write ``adapter_ref`` as package ``target`` in the Hub layout into ``folder`` (empty or new).
    Returns ``{folder, files, manifest_digest}``. Raises what ``build_package`` raises."""
    from .client import build_package

    out = Path(folder)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} is not empty", field="DIR", hint="export into a new or empty folder")
    pkg = build_package(ws, adapter_ref, target, **package_options)
    m = pkg.manifest
    written = []
    for f in m["files"]:
        dest = out / hub_path(f["path"])
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(dest, pkg.files[f["path"]].read_bytes())
        written.append(hub_path(f["path"]))
    write_text(out / "finetrace" / "manifest.json", json.dumps(m, indent=1, sort_keys=True) + "\n")
    write_text(out / "finetrace" / "signature.json", json.dumps(pkg.signature, indent=1) + "\n")
    for name, entries in _eval_results(m).items():
        (out / ".eval_results").mkdir(exist_ok=True)
        write_text(out / ".eval_results" / name, yaml.safe_dump(entries, sort_keys=False))
        written.append(f".eval_results/{name}")
    card = next((pkg.files[f["path"]] for f in m["files"] if f["path"].startswith("documents/model_card")), None)
    body = card.read_text("utf-8") if card else f"# {m['package']['name']}\n\n{m.get('description', '')}\n"
    front = yaml.safe_dump(card_metadata(m), sort_keys=False, allow_unicode=True)
    write_text(out / "README.md", f"---\n{front}---\n\n{body}")
    return {
        "folder": str(out),
        "files": sorted([*written, "README.md", "finetrace/manifest.json", "finetrace/signature.json"]),
        "manifest_digest": pkg.digest,
    }


def _read_card(folder: Path) -> dict:
    from huggingface_hub import ModelCard

    readme = folder / "README.md"
    if not readme.is_file():
        raise InputError(f"{folder} has no README.md", field="DIR", hint="a Hub model folder starts with its card")
    return ModelCard.load(readme).data.to_dict()


def _check_files(folder: Path, manifest: dict) -> None:
    for f in manifest["files"]:
        check_path(f["path"])
        p = folder / hub_path(f["path"])
        if not p.is_file():
            raise IntegrityError(f"{hub_path(f['path'])}: listed in the signed manifest, missing from {folder}")
        got = sha256_file(p)
        if got != f["digest"] or p.stat().st_size != f["size"]:
            raise IntegrityError(
                f"{hub_path(f['path'])}: hashes to {got}, the signed manifest says {f['digest']}",
                hint="the folder was changed after export; fetch it again",
            )


def import_hub(
    ws: Workspace,
    folder: str | Path,
    trust_keys: list[str] = (),
    name: str | None = None,
    allow_template_change: bool = False,
) -> tuple[Artifact, dict]:
    """Record the adapter of a Hub folder (see the module docstring); returns it and the facts checked.
    Tokenizer files or a chat template that differ from the base's are refused (``template_check``)
    unless ``allow_template_change``."""
    folder = Path(folder)
    meta = _read_card(folder)
    man_path, sig_path = folder / "finetrace" / "manifest.json", folder / "finetrace" / "signature.json"
    facts: dict = {"card": {k: meta.get(k) for k in ("base_model", "base_model_relation", "license", "datasets")}}
    if man_path.is_file() and sig_path.is_file():
        manifest, signature = json.loads(man_path.read_text("utf-8")), json.loads(sig_path.read_text("utf-8"))
        key = verify(manifest, signature)["key_id"]
        if key not in set(trust_keys):
            raise IntegrityError(
                f"{folder} is signed by {key}, which is not a trusted key",
                hint=f"if you trust this publisher, pass --trust-key {key}",
            )
        _check_files(folder, manifest)
        att = folder / "finetrace" / "attestation" / "attestation.dsse.json"
        if att.is_file():
            verify_attestation(json.loads(att.read_text("utf-8")), manifest["publisher"]["public_key"], manifest)
        base_digest, want = manifest["base_model"]["digest"], manifest["adapter"]["digest"]
        adapter_meta = {k: v for k, v in manifest["adapter"].items() if k != "digest"}
        facts.update(
            verified=True,
            key_id=key,
            manifest_digest=manifest_digest(manifest),
            package="{namespace}/{name}@{version}".format(**manifest["package"]),
            attestation=att.is_file(),
            unverified=[],
        )
        default_name = "{namespace}/{name}".format(**manifest["package"])
    else:
        base_digest = (meta.get("finetrace") or {}).get("base_model_digest") or ""
        want, adapter_meta, default_name = None, {}, folder.name
        facts.update(verified=False, unverified=["signature", "file digests", "attestation", "lineage"])
    base = _local_base(ws, base_digest, meta.get("base_model"))
    base_dir = ws.store.materialize(base.digest)
    declared = adapter_meta
    if not declared and (folder / "finetrace_adapter.json").is_file():
        declared = json.loads((folder / "finetrace_adapter.json").read_text("utf-8"))
    facts["template_differences"] = template_check.check(
        template_check.compare_files(folder, base_dir) + template_check.compare_identity(declared, base_dir),
        str(folder),
        allow_template_change,
    )
    names = (
        [f["path"][len("adapter/") :] for f in manifest["files"] if f["path"].startswith("adapter/")]
        if facts["verified"]
        else [n for n in ADAPTER_FILES if (folder / n).is_file()]
    )
    digest = _store_adapter(ws, folder, names, base_dir)
    if want is not None and digest != want:
        raise IntegrityError(f"the adapter files hash to {digest}, the publisher signed {want}")
    facts["adapter_digest"] = digest
    docs = {}
    if facts["verified"]:  # the evidence, recorded like a pull's (the same digests the publisher signed)
        docs = {
            f["path"]: ws.store.put_file(folder / hub_path(f["path"]))
            for f in manifest["files"]
            if f["path"].startswith(("documents/", "attestation/"))
        }
    with ws.ledger.run(
        "pull",
        config={
            "hub_folder": str(folder.resolve()),
            **{k: facts.get(k) for k in ("package", "manifest_digest", "key_id", "verified")},
        },
        inputs=[base.digest],
    ) as run:
        art = run.output(
            "adapter",
            digest,
            name=name or default_name,
            metadata={
                **adapter_meta,
                "base_model": base.digest,
                "market": {
                    "hub": facts.get("package") or folder.name,
                    "verified": facts["verified"],
                    "unverified": facts["unverified"],
                },
            },
        )
        for path, d in docs.items():
            try:
                run.output(
                    "document",
                    d,
                    metadata={
                        "adapter": digest,
                        "document": Path(path).stem.split(".")[0],
                        "package": facts["package"],
                        "path": path,
                    },
                )
            except InputError:
                pass  # the same bytes are already recorded here as another kind of artifact
        facts["documents"] = docs
    return art, facts


def _store_adapter(ws: Workspace, folder: Path, names: list[str], base_dir: Path) -> str:
    """Check the adapter files ``names`` of ``folder`` against the base and put them in the store; their digest."""
    tmp = Path(tempfile.mkdtemp(dir=ws.root / "cache", prefix=".hub-"))
    try:
        parsed = {}
        for rel in names:
            src = folder / hub_path(f"adapter/{rel}")
            parsed[rel] = check_file(f"adapter/{rel}", src.read_bytes())
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)
        if "adapter_config.json" not in parsed or "adapter_model.safetensors" not in parsed:
            raise InputError(f"{folder} has no PEFT adapter (adapter_config.json, adapter_model.safetensors)")
        check_adapter(
            parsed["adapter_config.json"]["json"],
            parsed["adapter_model.safetensors"]["tensors"],
            base_shapes_from_folder(base_dir),
        )
        return ws.store.put_dir(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _local_base(ws: Workspace, digest: str, name: str | None) -> Artifact:
    try:
        if digest:
            art = ws.ledger.artifact(digest)
        elif name:
            art = ws.ledger.resolve(name, kind="base_model")
        else:
            raise NotFoundError("the card names no base model")
    except NotFoundError:
        raise NotFoundError(
            f"the adapter needs base model {name or ''} ({digest or 'digest unknown'}), which is not in this workspace",
            hint="add that exact base model first (`finetrace models add`)",
        ) from None
    if art.kind != "base_model":
        raise InputError(f"{art.digest} is a {art.kind} here, not a base model")
    return art
