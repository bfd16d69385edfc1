"""Everything the ledger knows about one adapter, gathered once for the documents, BOM and attestation.

``gather(ws, adapter_ref, intended)`` walks the ledger from the adapter: the training run (config,
environment, metrics), the base model (its files and ``config.json``), the parent adapter chain, the
datasets (``dataset.json`` + ``datasheet.json``), the evaluations of the adapter (``report.json``), gate
verdicts, overrides and approvals. It reads recorded facts only: a key that is absent stays absent, and
the templates render it as "not provided" with what would provide it. Nothing here is guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..ledger import Artifact
from ..ledger.adapter import adapter_record, recorded
from ..ledger.log import now
from ..workspace import Workspace
from ..yamlfile import read_mapping

# Keys of the intended-use YAML (``--intended-use FILE.yaml``): what a person must state because no
# machine can know it. ``REQUIRED`` missing => the documents say so and ``intended_use_missing`` is set.
REQUIRED_INTENDED = {
    "intended_use": "the purpose the adapter is meant for",
    "limitations": "known limitations and conditions under which it should not be relied on",
}
OPTIONAL_INTENDED = {
    "intended_users": "who is meant to use it",
    "out_of_scope_use": "uses that are out of scope or foreseeable misuse",
    "provider": "the provider's name and contact",
    "license": "the licence of the adapter (SPDX id, e.g. apache-2.0)",
    "human_oversight": "human-oversight measures (Art. 14)",
    "instructions_for_use": "instructions for use for deployers (Art. 13)",
    "user_interface": "the user interface provided to the deployer",
    "deployment_forms": "how it is placed on the market (download, API, package)",
    "hardware": "hardware it is intended to run on",
    "design_choices": "key design choices, their rationale and assumptions",
    "predetermined_changes": "pre-determined changes to the system and its performance",
    "cybersecurity": "cybersecurity measures beyond those finetrace applies",
    "risks": "foreseeable unintended outcomes and sources of risk",
    "metrics_rationale": "why the evaluation metrics are appropriate",
    "risk_management": "the risk management system (Art. 9)",
    "changes": "relevant changes made through the lifecycle",
    "harmonised_standards": "harmonised standards or other specifications applied",
    "declaration_of_conformity": "the EU declaration of conformity (Art. 47), or where it is kept",
    "post_market_monitoring": "the post-market monitoring system and plan (Art. 72)",
    "ethical_considerations": "ethical considerations",
    "caveats": "caveats and recommendations",
    "factors": "relevant factors (groups, environments, instrumentation)",
    "tags": "extra model-card tags (a list)",
}


@dataclass
class Facts:
    """The gathered facts (plain data, rendered by the templates)."""

    adapter: dict
    base: dict | None
    train_run: dict | None
    parents: list[dict]
    datasets: list[dict]
    evaluations: list[dict]
    verdicts: list[dict]
    overrides: list[dict]
    approvals: list[dict]
    previous_versions: list[dict]
    intended: dict
    intended_source: str | None
    checkpoint: dict | None
    finetrace_version: str
    generated: str = field(default_factory=now)
    parity: list[dict] = field(default_factory=list)  # parity.result events: served == evaluated?

    @property
    def intended_use_missing(self) -> list[str]:
        return [k for k in REQUIRED_INTENDED if not _given(self.intended.get(k))]

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["intended_use_missing"] = self.intended_use_missing
        return d


def _given(v: Any) -> bool:
    return v not in (None, "", [], {})


def _run_dict(ws: Workspace, run_id: str | None) -> dict | None:
    if not run_id:
        return None
    return ws.ledger.get_run(run_id).to_dict()


def files_of(ws: Workspace, digest: str) -> list[dict]:
    """``[{"path", "size", "digest"}]`` of a folder artifact (empty for a file object)."""
    if not ws.store.has(digest) or not ws.store.is_tree(digest):
        return []
    return [{"path": e.path, "size": e.size, "digest": e.digest} for e in ws.store.tree(digest)]


def _art(a: Artifact) -> dict:
    return {
        "ref": a.ref,
        "name": a.name,
        "version": a.version,
        "digest": a.digest,
        "kind": a.kind,
        "metadata": a.metadata,
        "run_id": a.run_id,
        "created": a.created,
        "aliases": a.aliases,
    }


def events_for(ws: Workspace, type: str, adapter: str) -> list[dict]:
    return [
        {"seq": e.seq, "time": e.time, "actor": e.actor, **e.data}
        for e in ws.ledger.entries(type=type)
        if e.data.get("adapter") == adapter
    ]


def _unrecorded(digest: str) -> dict:
    return {"ref": digest, "digest": digest, "kind": "unrecorded", "metadata": {}}


def _dataset(ws: Workspace, digest: str) -> dict:
    a = recorded(ws.ledger, digest)
    d = _art(a) if a is not None else _unrecorded(digest)
    d["info"] = ws.store.member_json(digest, "dataset.json") or {}
    d["datasheet"] = ws.store.member_json(digest, "datasheet.json")
    d["files"] = files_of(ws, digest)
    d["import_run"] = _run_dict(ws, d.get("run_id"))
    used = [ws.ledger.get_run(r) for r in ws.ledger.consumers(digest)]
    d["first_used"] = min((r.started for r in used if r.kind == "train"), default=None)
    sheet = d["datasheet"] or {}
    d["given"] = sheet.get("given") or {}
    d["measured"] = sheet.get("measured") or {}
    d["gaps"] = sheet.get("gaps") if d["datasheet"] else ["datasheet.json (the whole datasheet)"]
    info = d["info"]
    if info.get("schema") == "classification" and info.get("labels"):  # what a prompt to the adapter must be
        from ..data.schemas import LEGACY_PROMPT_FORMAT, classification_prompt

        fmt = info.get("prompt_format") or LEGACY_PROMPT_FORMAT
        d["prompt_format"] = {"name": fmt, "template": classification_prompt("<text>", info["labels"], fmt)}
    return d


def _evaluation(ws: Workspace, art: Artifact, adapter: str) -> dict:
    from ..evaluate.schema import EvalReport

    data = ws.store.member_json(art.digest, "report.json")
    if data is None:
        return {
            **_art(art),
            "run": _run_dict(ws, art.run_id),
            "report": {},
            "subject": None,
            "base_subject": None,
            "files": files_of(ws, art.digest),
        }
    rep = EvalReport.parse(data, source=f"{art.ref}/report.json")
    subject, base = rep.subject(adapter), rep.base
    return {
        **_art(art),
        "run": _run_dict(ws, art.run_id),
        "report": rep.to_dict(examples=False),
        "subject": subject.to_dict() if subject else None,
        "base_subject": base.to_dict() if base else None,
        "files": files_of(ws, art.digest),
    }


def gather(ws: Workspace, adapter_ref: str, intended: dict | None = None, intended_source: str | None = None) -> Facts:
    """Collect the facts about ``adapter_ref`` (name, name@N or digest) from the ledger and store."""
    from importlib import metadata as md

    led = ws.ledger
    adapter = led.resolve(adapter_ref)
    if adapter.kind not in ("adapter", "model"):
        from ..errors import InputError

        raise InputError(
            f"{adapter_ref} is a {adapter.kind}, not an adapter",
            hint="give the adapter produced by `finetrace train` (NAME@N)",
        )
    rec = adapter_record(ws, adapter.digest)
    ad = _art(adapter)
    ad["files"] = files_of(ws, adapter.digest)
    ad["peft_config"] = ws.store.member_json(adapter.digest, "adapter_config.json")
    ad["finetrace"] = rec.meta
    train_run = rec.run.to_dict() if rec.run else None

    base = None
    if rec.base_digest:
        base = _art(rec.base) if rec.base is not None else _unrecorded(rec.base_digest)
        base["files"] = files_of(ws, rec.base_digest)
        base["config"] = ws.store.member_json(rec.base_digest, "config.json")
        base["run"] = _run_dict(ws, base.get("run_id"))
    parents = [
        _art(p) if not isinstance(p, str) else {"ref": p, "digest": p, "kind": "unrecorded"} for p in rec.parents
    ]
    datasets = [_dataset(ws, a.digest) for a in rec.datasets]
    evaluations = [_evaluation(ws, a, adapter.digest) for a in rec.eval_reports]

    previous = []
    if adapter.name:
        for a in led.artifacts(adapter.kind):
            if a.digest != adapter.digest and any(al.rsplit("@", 1)[0] == adapter.name for al in a.aliases):
                if a.created < adapter.created:
                    previous.append(_art(a))

    cps = led.checkpoints()
    try:
        version = md.version("finetrace")
    except md.PackageNotFoundError:
        version = "unknown"
    return Facts(
        adapter=ad,
        base=base,
        train_run=train_run,
        parents=parents,
        datasets=datasets,
        evaluations=evaluations,
        verdicts=events_for(ws, "gate.verdict", adapter.digest),
        overrides=events_for(ws, "gate.override", adapter.digest),
        approvals=events_for(ws, "approval", adapter.digest),
        previous_versions=previous,
        intended=dict(intended or {}),
        intended_source=intended_source,
        checkpoint=cps[-1].to_dict() if cps else None,
        finetrace_version=version,
        parity=events_for(ws, "parity.result", adapter.digest),
    )


def load_intended(path) -> dict:
    """The intended-use YAML: a mapping of the keys above; an unknown key names the closest one."""
    from ..errors import ConfigError

    if path is None:
        return {}
    return read_mapping(
        path,
        "intended-use file",
        missing_hint="write a YAML file with intended_use: and limitations: (see `finetrace docs --help`)",
        error=ConfigError,
        known=list(REQUIRED_INTENDED) + list(OPTIONAL_INTENDED),
        noun="intended-use key",
    )
