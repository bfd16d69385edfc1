"""A CycloneDX 1.6 ML-BOM (JSON) of an adapter: the adapter, its base model and its datasets, with hashes.

Components (every one with a SHA-256):

    machine-learning-model  the adapter (bom-ref = its folder digest), with a modelCard: approach, task,
                            datasets, performance metrics with intervals, use cases, limitations,
                            fairness assessments, fine-tuning energy (estimated)
    machine-learning-model  the base model
    data                    each training dataset (with owner, classification, governance)
    file                    every file of the adapter, base model and datasets (nested ``components``)

A folder's ``hashes`` entry is the SHA-256 of its finetrace tree manifest (the artifact digest, property
``finetrace:digest-of``=``finetrace-tree/1 manifest``); each file component carries the file's own hash.
``validate(bom)`` checks it against the CycloneDX 1.6 JSON schema shipped in ``cyclonedx-python-lib``.
"""

from __future__ import annotations

import json
import uuid

from ..errors import DependencyError, IntegrityError
from .facts import Facts

SPEC_VERSION = "1.6"


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def _hashes(digest: str) -> list[dict]:
    return [{"alg": "SHA-256", "content": _hex(digest)}]


def _files(prefix: str, files: list[dict]) -> list[dict]:
    return [
        {
            "type": "file",
            "bom-ref": f"{prefix}/{f['path']}",
            "name": f["path"],
            "hashes": _hashes(f["digest"]),
            "properties": [{"name": "finetrace:size", "value": str(f["size"])}],
        }
        for f in files
    ]


def _tree_props(digest: str) -> list[dict]:
    return [
        {"name": "finetrace:digest", "value": digest},
        {"name": "finetrace:digest-of", "value": "finetrace-tree/1 manifest (sorted paths, sizes, file digests)"},
    ]


def _performance_and_fairness(facts: Facts) -> tuple[list[dict], list[dict]]:
    """The model card's performance metrics (overall and per group) and its fairness assessments."""
    perf = []
    fairness = []
    for ev in facts.evaluations:
        sub = ev.get("subject") or {}
        split = (ev.get("report") or {}).get("dataset", {}).get("split", "")
        for name, m in (sub.get("metrics") or {}).items():
            pm = {"type": name, "value": str(m.get("value")), "slice": f"{ev['ref']}:{split}"}
            if m.get("ci") and len(m["ci"]) == 2:
                pm["confidenceInterval"] = {"lowerBound": str(m["ci"][0]), "upperBound": str(m["ci"][1])}
            perf.append(pm)
        for metric, g in (sub.get("groups") or {}).items():
            for gname, gv in (g.get("groups") or {}).items():
                perf.append({"type": metric, "value": str(gv.get("value")), "slice": f"group={gname}"})
        bias = sub.get("bias")
        if bias:
            fairness.append(
                {
                    "groupAtRisk": ", ".join(bias.get("categories") or {}) or "counterfactual groups",
                    "benefits": "",
                    "harms": f"answer flip rate {bias.get('flip_rate')} under "
                    f"counterfactual swaps, group gap {bias.get('group_gap')}",
                    "mitigationStrategy": "eval gates (max_flip_rate, max_group_gap) before release",
                }
            )
    return perf, fairness


def _considerations(facts: Facts, fairness: list[dict], metrics: dict) -> dict:
    """The model card's considerations: intended use, limitations, fairness, fine-tuning energy."""
    considerations: dict = {}
    it = facts.intended
    if it.get("intended_users"):
        considerations["users"] = [str(it["intended_users"])]
    if it.get("intended_use"):
        considerations["useCases"] = [str(it["intended_use"])]
    if it.get("limitations"):
        considerations["technicalLimitations"] = [str(it["limitations"])]
    if it.get("ethical_considerations"):
        considerations["ethicalConsiderations"] = [{"name": str(it["ethical_considerations"])}]
    if fairness:
        considerations["fairnessAssessments"] = fairness
    if metrics.get("energy_wh_estimate") is not None:
        considerations["environmentalConsiderations"] = {
            "energyConsumptions": [
                {
                    "activity": "fine-tuning",
                    "energyProviders": [
                        {
                            "organization": {"name": "unknown"},
                            "energySource": "unknown",
                            "energyProvided": {"value": metrics["energy_wh_estimate"] / 1000, "unit": "kWh"},
                            "description": f"estimated: wall time {metrics.get('wall_time_s')} s x "
                            f"assumed {metrics.get('assumed_watts')} W",
                        }
                    ],
                    "activityEnergyCost": {"value": metrics["energy_wh_estimate"] / 1000, "unit": "kWh"},
                }
            ],
            "properties": [{"name": "finetrace:flops_estimate", "value": str(metrics.get("flops_estimate"))}],
        }
    return considerations


def _model_card(facts: Facts) -> dict:
    """The adapter's CycloneDX modelCard: parameters, quantitative analysis, considerations."""
    ad, base = facts.adapter, facts.base
    tr = facts.train_run or {}
    metrics = tr.get("metrics") or {}
    ds_refs = [{"ref": d["digest"]} for d in facts.datasets]
    perf, fairness = _performance_and_fairness(facts)
    considerations = _considerations(facts, fairness, metrics)
    task = (
        "text-classification"
        if any(d.get("info", {}).get("schema") == "classification" for d in facts.datasets)
        else "text-generation"
    )
    model_card: dict = {
        "modelParameters": {
            "approach": {"type": "supervised"},
            "task": task,
            "architectureFamily": ((base or {}).get("config") or {}).get("model_type", "transformer"),
            "modelArchitecture": f"{ad['metadata'].get('method', 'lora')} adapter (r={ad['metadata'].get('r')})",
            "datasets": ds_refs,
            "inputs": [{"format": "text"}],
            "outputs": [{"format": "text"}],
        }
    }
    if perf:
        model_card["quantitativeAnalysis"] = {"performanceMetrics": perf}
    if considerations:
        model_card["considerations"] = considerations
    return model_card


# duplicates: alike _dataset_component on purpose (CycloneDX components of two types, each written out field by field).
def _adapter_component(facts: Facts) -> dict:
    """The adapter's machine-learning-model component, with its model card and files."""
    ad, base = facts.adapter, facts.base
    adapter_comp = {
        "type": "machine-learning-model",
        "bom-ref": ad["digest"],
        "name": ad.get("name") or ad["digest"],
        "version": str(ad.get("version") or "0"),
        "hashes": _hashes(ad["digest"]),
        "description": f"{ad['metadata'].get('method', 'lora')} adapter of {(base or {}).get('ref')}",
        "modelCard": _model_card(facts),
        "properties": _tree_props(ad["digest"]),
        "components": _files(ad["digest"], ad.get("files") or []),
    }
    if facts.intended.get("license"):
        adapter_comp["licenses"] = [{"license": {"name": str(facts.intended["license"])}}]
    return adapter_comp


def _base_component(base: dict) -> dict:
    """The frozen base model's machine-learning-model component."""
    return {
        "type": "machine-learning-model",
        "bom-ref": base["digest"],
        "name": base.get("name") or base["digest"],
        "version": str(base.get("version") or "0"),
        "hashes": _hashes(base["digest"]),
        "description": "pre-trained base model (frozen)",
        "properties": _tree_props(base["digest"]),
        "components": _files(base["digest"], base.get("files") or []),
    }


# duplicates: alike _adapter_component on purpose (CycloneDX components of two types, each written out field by field).
def _dataset_component(d: dict) -> dict:
    """A training dataset's data component, with its datasheet as properties."""
    g = d.get("given") or {}
    data_entry: dict = {
        "type": "dataset",
        "name": d.get("ref") or d["digest"],
        "description": str(g.get("description") or g.get("title") or d.get("info", {}).get("schema", "")),
    }
    if g.get("personal_data") is not None:
        data_entry["sensitiveData"] = [f"personal data: {g.get('personal_data')}"]
    if g.get("owner"):
        data_entry["governance"] = {"owners": [{"organization": {"name": str(g["owner"])}}]}
    comp = {
        "type": "data",
        "bom-ref": d["digest"],
        "name": d.get("name") or d["digest"],
        "version": str(d.get("version") or "0"),
        "hashes": _hashes(d["digest"]),
        "data": [data_entry],
        "properties": _tree_props(d["digest"])
        + [{"name": f"finetrace:datasheet:{k}", "value": str(v)} for k, v in sorted(g.items())],
        "components": _files(d["digest"], d.get("files") or []),
    }
    if g.get("license"):
        comp["licenses"] = [{"license": {"name": str(g["license"])}}]
    return comp


def build(facts: Facts) -> dict:
    """The ML-BOM as a dict (serialise with ``json.dumps``)."""
    ad, base = facts.adapter, facts.base
    comps = [_adapter_component(facts)]
    deps = [d["digest"] for d in facts.datasets]
    if base:
        comps.append(_base_component(base))
        deps.insert(0, base["digest"])
    for d in facts.datasets:
        comps.append(_dataset_component(d))
    return {
        "$schema": "http://cyclonedx.org/schema/bom-1.6.schema.json",
        "bomFormat": "CycloneDX",
        "specVersion": SPEC_VERSION,
        "serialNumber": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, 'finetrace:' + ad['digest'] + ':' + facts.generated)}",
        "version": 1,
        "metadata": {
            "timestamp": facts.generated,
            "tools": {"components": [{"type": "application", "name": "finetrace", "version": facts.finetrace_version}]},
            "component": {
                "type": "machine-learning-model",
                "bom-ref": "root:" + ad["digest"],
                "name": ad.get("name") or ad["digest"],
                "version": str(ad.get("version") or "0"),
                "hashes": _hashes(ad["digest"]),
            },
        },
        "components": comps,
        "dependencies": [{"ref": ad["digest"], "dependsOn": deps}],
    }


def validate(bom: dict) -> None:
    """Validate against the CycloneDX 1.6 JSON schema (strict); IntegrityError naming the first error."""
    try:
        from cyclonedx.schema import SchemaVersion
        from cyclonedx.validation.json import JsonStrictValidator
    except ImportError:
        raise DependencyError(
            "validating an ML-BOM needs cyclonedx-python-lib",
            hint="pip install 'cyclonedx-python-lib[json-validation]'",
        ) from None
    err = JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(bom))
    if err is not None:
        raise IntegrityError(f"the ML-BOM does not validate against the CycloneDX 1.6 schema: {err}")
