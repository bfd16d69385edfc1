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

from ..errors import FinetraceError, InputError, NotFoundError
from ..evaluate.schema import EvalReport, ModelResult, read_report
from ..ledger import Artifact
from ..workspace import Workspace

ENGINES = ("native", "llamacpp", "vllm")
DEFAULT_MIN_AGREEMENT = {"native": 1.0}  # other engines: 0.95 unless the gate says otherwise


class ParityRefused(FinetraceError):
    """The served answers do not agree enough with the evaluated ones (deploy/publish refused)."""


@dataclass
class ParityResult:
    adapter: str  # digest served
    report: str  # eval report digest replayed
    evaluated_adapter: str  # digest the report evaluated
    engine: str
    n: int
    agreeing: int
    differing: list[dict] = field(default_factory=list)  # [{"i", "id", "eval", "served"}]
    run_id: str | None = None

    @property
    def agreement(self) -> float:
        return self.agreeing / self.n if self.n else 1.0

    @property
    def exact(self) -> bool:
        return self.agreeing == self.n

    # duplicates: alike ledger/records.py:to_dict on purpose (to_dict of a record type).
    # duplicates: alike ledger/verify.py:to_dict on purpose (to_dict of a record type).
    def to_dict(self) -> dict:
        return {
            "adapter": self.adapter,
            "report": self.report,
            "evaluated_adapter": self.evaluated_adapter,
            "engine": self.engine,
            "n": self.n,
            "agreeing": self.agreeing,
            "agreement": self.agreement,
            "exact": self.exact,
            "differing": self.differing[:50],
            "run_id": self.run_id,
        }


def find_report(
    ws: Workspace, adapter: Artifact, report_ref: str | None = None
) -> tuple[Artifact, EvalReport, ModelResult]:
    """(report artifact, report, subject) for ``adapter``: the given report, else the latest eval report
    that evaluated this digest, else the latest that evaluated an adapter of the same name."""
    cands = (
        [ws.ledger.resolve(report_ref, kind="eval_report")]
        if report_ref
        else list(reversed(ws.ledger.artifacts("eval_report")))
    )
    for want in ("digest", "name"):
        for art in cands:
            rep = read_report(ws, art.digest)
            for s in rep.tuned:
                if s.adapter == adapter.digest or (
                    want == "name" and adapter.name and s.ref.split("@")[0] == adapter.name
                ):
                    return art, rep, s
    raise NotFoundError(
        f"no eval report covers adapter {adapter.ref} ({adapter.digest})",
        hint=f"run `finetrace eval --adapter {adapter.ref}` first",
    )


def _replay(engine, peft_name: str, rep: EvalReport, examples) -> list:
    """What the serving engine answers for every example: token ids, or labels for constrained reports."""
    from ..decoding import Seq, encode_chat

    tok = engine.tokenizer
    suite = rep.suite
    rows = [encode_chat(tok, e.messages) for e in examples]
    if rep.task == "classification" and suite.scoring == "constrained":
        return engine.classify(rows, rep.dataset.labels, peft_name)
    seqs = [Seq(r, peft_name, suite.max_new_tokens, stop=list(suite.stop)) for r in rows]
    engine.decoder.run(seqs)
    return [list(s.ids) for s in seqs]


def parity(
    ws: Workspace,
    adapter_ref: str,
    engine: str = "native",
    report_ref: str | None = None,
    base_ref: str | None = None,
    upstream: str | None = None,
) -> ParityResult:
    """Replay the eval report's prompts through the serving engine and compare; records a ``parity`` run."""
    from ..evaluate.evalset import load_eval_set
    from .engine import Engine
    from .settings import ServeSettings

    if engine not in ENGINES:
        raise NotFoundError(f"unknown parity engine {engine!r}", hint=f"one of {', '.join(ENGINES)}")
    adapter = ws.ledger.resolve(adapter_ref, kind="adapter")
    rep_art, rep, subject = find_report(ws, adapter, report_ref)
    base = base_ref or rep.base_model.digest
    es = load_eval_set(ws, rep.dataset.digest, rep.dataset.split, rep.suite.limit)
    config = {
        "engine": engine,
        "adapter": adapter.digest,
        "report": rep_art.digest,
        "evaluated_adapter": subject.adapter,
    }
    if engine != "native":
        return _parity_gateway(ws, adapter, engine, rep_art, rep, subject, base, es, config, upstream)
    with ws.ledger.run("parity", config, inputs=[base, adapter.digest, rep_art.digest]) as run:
        eng = Engine(ws, base, [adapter.digest], ServeSettings(max_batch=rep.suite.batch_size or 16))
        _, peft_name, _ = eng.resolve_model(adapter.ref)
        served = _replay(eng, peft_name, rep, es.examples)
        recorded = subject.answer_tokens or subject.answers
        if subject.answer_tokens is None and rep.task != "classification":
            served = [eng.tokenizer.decode(s, skip_special_tokens=True).strip() for s in served]
        res = _compare(run, adapter, rep_art, subject, engine, es, recorded, served)
        run.event("parity.result", res.to_dict())
    return res


def _compare(run, adapter, rep_art, subject, engine: str, es, recorded: list, served: list) -> ParityResult:
    """Answer by answer, the recorded eval answers against the served ones, as ``run``'s metrics (both engines)."""
    res = ParityResult(adapter.digest, rep_art.digest, str(subject.adapter), engine, len(served), 0, run_id=run.id)
    for i, (a, b) in enumerate(zip(recorded, served)):
        if a == b:
            res.agreeing += 1
        else:
            res.differing.append({"i": i, "id": es.examples[i].id, "eval": a, "served": b})
    run.metrics.update({"agreement": res.agreement, "n": res.n, "differing": len(res.differing)})
    return res


def _parity_gateway(
    ws, adapter, engine: str, rep_art, rep, subject, base: str, es, config: dict, upstream: str | None = None
) -> ParityResult:
    """Parity on an engine behind the gateway (llama.cpp, vLLM): the same rendered prompt tokens forwarded
    greedy to the engine, its answers compared as normalised text with the recorded ones (token ids do not
    come back from every engine); an agreement rate, never silence."""
    from ..decoding.text import cut_at_stop, normalise_answer
    from .engines import open_engine
    from .engines.gateway import replay_texts
    from .settings import ServeSettings

    if rep.task == "classification":
        raise NotFoundError(
            f"parity of a classification report needs label scoring: engine {engine!r} has none",
            hint="run parity with --engine native",
        )
    suite = rep.suite
    with ws.ledger.run("parity", config, inputs=[base, adapter.digest, rep_art.digest]) as run:
        eng = open_engine(ws, base, [adapter.digest], ServeSettings(), engine, upstream)
        try:
            eng.backend.start(eng.base_dir, eng.base, list(eng._adapters.values()))
            run.event("parity.engine", eng.backend.describe())
            mid = eng.resolve_model(adapter.digest)[0]
            stop = list(suite.stop or [])
            served = replay_texts(
                eng,
                [eng.encode_chat(e.messages) for e in es.examples],
                mid,
                suite.max_new_tokens,
                stop,
                token_ids=bool(subject.answer_tokens),
            )
        finally:
            eng.backend.stop()
        tokens = bool(served) and isinstance(served[0], list)

        def as_text(ids):  # both sides decoded by ONE tokenizer, cut at the suite's stops, normalised
            return normalise_answer(cut_at_stop(eng.tokenizer.decode(ids, skip_special_tokens=True), stop))

        if tokens:
            recorded, served = [as_text(t) for t in subject.answer_tokens], [as_text(t) for t in served]
        else:
            recorded = subject.answers or [as_text(t) for t in subject.answer_tokens]
        config["compared"] = "token ids, decoded by the base's tokenizer" if tokens else "the engine's text"
        res = _compare(run, adapter, rep_art, subject, engine, es, recorded, served)
        run.event(
            "parity.result",
            {**res.to_dict(), "engine_version": eng.backend.describe().get("version"), "compared": config["compared"]},
        )
    return res


def latest_parity(ws: Workspace, adapter_digest: str) -> dict | None:
    """The latest recorded ``parity.result`` for an adapter digest (what documents and provenance state)."""
    found = None
    for e in ws.ledger.entries(type="parity.result"):
        if e.data.get("adapter") == adapter_digest:
            found = e.data
    return found


def require_parity(
    ws: Workspace,
    adapter_ref: str,
    min_agreement: float | None = None,
    engine: str = "native",
    report_ref: str | None = None,
    upstream: str | None = None,
) -> ParityResult:
    """Run parity and refuse (``ParityRefused``) below ``min_agreement`` (default: 1.0 on native)."""
    res = parity(ws, adapter_ref, engine, report_ref, upstream=upstream)
    floor = DEFAULT_MIN_AGREEMENT.get(engine, 0.95) if min_agreement is None else min_agreement
    if res.agreement < floor:
        first = res.differing[0]["i"] if res.differing else None
        raise ParityRefused(
            f"served answers agree with the evaluated ones on {res.agreeing}/{res.n} examples "
            f"({res.agreement:.1%}), below min_serve_agreement {floor:g} (first difference: example {first})",
            hint="the adapter served is not the one evaluated, or the decoders differ: re-evaluate the adapter "
            "being deployed",
        )
    return res


def _replayable(ws: Workspace, report_digest: str) -> bool:
    """True when the report names an eval set this workspace holds (so its prompts can be replayed)."""
    try:
        digest = read_report(ws, report_digest).dataset.digest
        return bool(digest) and ws.ledger.has_artifact(digest)
    except (NotFoundError, InputError, OSError):
        return False


def publish_gate(
    ws: Workspace, adapter_digest: str, report_digest: str | None, min_agreement: float | None = None
) -> dict | None:
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
            hint="publish the adapter that was evaluated, or re-evaluate this one (then `finetrace parity`)",
        )
    return rec
