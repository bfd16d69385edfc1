"""Parity: is what is served what was evaluated? The eval set's prompts replayed through the serving engine.

    res = parity(ws, "legal@1")                       # the latest eval report of legal@1 (or of its name)
    res.agreement, res.exact, res.differing           # 1.0, True, [] when the served answers are the eval's
    require_parity(ws, "legal@1", min_agreement=1.0)  # raises ParityRefused below the gate

The replay loads the adapter into a serving ``Engine`` (the same adapter verification, the same decoder,
gathered LoRA and KV cache as ``finetrace serve``) and decodes every prompt of the eval report's
examples with the report's ``max_new_tokens`` and stop strings, greedy, as a mixed batch. On the native
engine the answers must be token-exact: the report's ``answer_tokens`` against the served token ids (for
classification reports: the served label, from the same label scoring, against the recorded one). The
agreement rate and the differing examples are recorded as a ``parity`` run in the ledger (inputs:
base, adapter, report) with a ``parity.result`` event that deploy gates, documents and provenance read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import FinetraceError, NotFoundError
from ..ledger import Artifact
from ..workspace import Workspace

ENGINES = ("native",)
DEFAULT_MIN_AGREEMENT = {"native": 1.0}


class ParityRefused(FinetraceError):
    """The served answers do not agree enough with the evaluated ones (deploy/publish refused)."""


@dataclass
class ParityResult:
    adapter: str                    # digest served
    report: str                     # eval report digest replayed
    evaluated_adapter: str          # digest the report evaluated
    engine: str
    n: int
    agreeing: int
    differing: list[dict] = field(default_factory=list)   # [{"i", "id", "eval", "served"}]
    run_id: str | None = None

    @property
    def agreement(self) -> float:
        return self.agreeing / self.n if self.n else 1.0

    @property
    def exact(self) -> bool:
        return self.agreeing == self.n

    def to_dict(self) -> dict:
        return {"adapter": self.adapter, "report": self.report, "evaluated_adapter": self.evaluated_adapter,
                "engine": self.engine, "n": self.n, "agreeing": self.agreeing, "agreement": self.agreement,
                "exact": self.exact, "differing": self.differing[:50], "run_id": self.run_id}


def _load_report(ws: Workspace, art: Artifact) -> dict:
    import json

    return json.loads((ws.store.materialize(art.digest) / "report.json").read_text("utf-8"))


def find_report(ws: Workspace, adapter: Artifact, report_ref: str | None = None) -> tuple[Artifact, dict, dict]:
    """(report artifact, report, subject) for ``adapter``: the given report, else the latest eval report
    that evaluated this digest, else the latest that evaluated an adapter of the same name."""
    cands = [ws.ledger.resolve(report_ref, kind="eval_report")] if report_ref else \
        list(reversed(ws.ledger.artifacts("eval_report")))
    for want in ("digest", "name"):
        for art in cands:
            rep = _load_report(ws, art)
            for s in rep.get("models", []):
                if not s.get("adapter"):
                    continue
                if s["adapter"] == adapter.digest or (want == "name" and adapter.name
                                                      and str(s.get("ref", "")).split("@")[0] == adapter.name):
                    return art, rep, s
    raise NotFoundError(f"no eval report covers adapter {adapter.ref} ({adapter.digest})",
                        hint=f"run `finetrace eval --adapter {adapter.ref}` first")


def _replay(engine, peft_name: str, rep: dict, examples) -> list:
    """What the serving engine answers for every example: token ids, or labels for constrained reports."""
    from ..decoding import Seq, encode_chat

    tok = engine.tokenizer
    suite = rep.get("suite", {})
    rows = [encode_chat(tok, e.messages) for e in examples]
    if rep.get("task") == "classification" and suite.get("scoring", "constrained") == "constrained":
        return engine.classify(rows, rep["dataset"]["labels"], peft_name)
    seqs = [Seq(r, peft_name, int(suite.get("max_new_tokens", 64)), stop=list(suite.get("stop") or []))
            for r in rows]
    engine.decoder.run(seqs)
    return [list(s.ids) for s in seqs]


def parity(ws: Workspace, adapter_ref: str, engine: str = "native", report_ref: str | None = None,
           base_ref: str | None = None) -> ParityResult:
    """Replay the eval report's prompts through the serving engine and compare; records a ``parity`` run."""
    from ..evaluate.evalset import load_eval_set
    from .engine import Engine
    from .settings import ServeSettings

    if engine not in ENGINES:
        raise NotFoundError(f"unknown parity engine {engine!r}", hint=f"one of {', '.join(ENGINES)}")
    adapter = ws.ledger.resolve(adapter_ref, kind="adapter")
    rep_art, rep, subject = find_report(ws, adapter, report_ref)
    base = base_ref or rep["base_model"]["digest"]
    ds = rep["dataset"]
    es = load_eval_set(ws, ds["digest"], ds["split"], rep.get("suite", {}).get("limit"))
    config = {"engine": engine, "adapter": adapter.digest, "report": rep_art.digest,
              "evaluated_adapter": subject["adapter"]}
    with ws.ledger.run("parity", config, inputs=[base, adapter.digest, rep_art.digest]) as run:
        eng = Engine(ws, base, [adapter.digest], ServeSettings(max_batch=int(rep.get("suite", {}).get(
            "batch_size", 16)) or 16))
        _, peft_name, _ = eng.resolve_model(adapter.ref)
        served = _replay(eng, peft_name, rep, es.examples)
        recorded = subject.get("answer_tokens") or subject.get("answers")
        if subject.get("answer_tokens") is None and rep.get("task") != "classification":
            served = [eng.tokenizer.decode(s, skip_special_tokens=True).strip() for s in served]
        res = ParityResult(adapter.digest, rep_art.digest, subject["adapter"], engine, len(served), 0, run_id=run.id)
        for i, (a, b) in enumerate(zip(recorded, served)):
            if a == b:
                res.agreeing += 1
            else:
                res.differing.append({"i": i, "id": es.examples[i].id, "eval": a, "served": b})
        run.metrics.update({"agreement": res.agreement, "n": res.n, "differing": len(res.differing)})
        run.event("parity.result", res.to_dict())
    return res


def latest_parity(ws: Workspace, adapter_digest: str) -> dict | None:
    """The latest recorded ``parity.result`` for an adapter digest (what documents and provenance state)."""
    found = None
    for e in ws.ledger.entries(type="parity.result"):
        if e.data.get("adapter") == adapter_digest:
            found = e.data
    return found


def require_parity(ws: Workspace, adapter_ref: str, min_agreement: float | None = None, engine: str = "native",
                   report_ref: str | None = None) -> ParityResult:
    """Run parity and refuse (``ParityRefused``) below ``min_agreement`` (default: 1.0 on native)."""
    res = parity(ws, adapter_ref, engine, report_ref)
    floor = DEFAULT_MIN_AGREEMENT.get(engine, 0.95) if min_agreement is None else min_agreement
    if res.agreement < floor:
        first = res.differing[0]["i"] if res.differing else None
        raise ParityRefused(
            f"served answers agree with the evaluated ones on {res.agreeing}/{res.n} examples "
            f"({res.agreement:.1%}), below min_serve_agreement {floor:g} (first difference: example {first})",
            hint="the adapter served is not the one evaluated, or the decoders differ: re-evaluate the adapter "
                 "being deployed")
    return res


def _replayable(ws: Workspace, report_digest: str) -> bool:
    """True when the report names an eval set this workspace holds (so its prompts can be replayed)."""
    try:
        digest = (_load_report(ws, ws.ledger.artifact(report_digest)).get("dataset") or {}).get("digest")
        return bool(digest) and ws.ledger.has_artifact(digest)
    except (NotFoundError, OSError, ValueError, KeyError):
        return False


def publish_gate(ws: Workspace, adapter_digest: str, report_digest: str | None,
                 min_agreement: float | None = None) -> dict | None:
    """The parity figure a publish relies on; raises ``ParityRefused`` below ``min_agreement`` (default 1.0).

    The latest recorded result for this adapter against its gating report is used; without one, the
    report's eval set is replayed now (and recorded). None when no report names an eval set this
    workspace holds (evidence imported from elsewhere): there is nothing to replay."""
    floor = DEFAULT_MIN_AGREEMENT["native"] if min_agreement is None else min_agreement
    rec = latest_parity(ws, adapter_digest)
    if rec is None or (report_digest and rec.get("report") != report_digest):
        if not report_digest or not _replayable(ws, report_digest):
            return None
        return require_parity(ws, adapter_digest, floor, report_ref=report_digest).to_dict()
    if rec["agreement"] < floor:
        raise ParityRefused(
            f"served answers agree with the evaluated ones on {rec['agreeing']}/{rec['n']} examples "
            f"({rec['agreement']:.1%}; parity run {rec.get('run_id')}), below min_serve_agreement {floor:g}",
            hint="publish the adapter that was evaluated, or re-evaluate this one (then `finetrace parity`)")
    return rec
