"""The evaluate stage's entry points: ``evaluate`` (base + at most one adapter) and ``compare``.

    evaluate(ws, "smollm2", "support@1:test", adapter_ref="support-lora@1", suite="suite.yaml") -> Artifact
    compare(ws, "smollm2", ["lora-a@1", "lora-b@1"], "support@1:test") -> Artifact

One ``evaluate`` run in the ledger reads the base model, the adapters, the dataset and the suite (stored
as canonical JSON, so its digest is an input too) and writes one ``eval_report`` folder
(``report.json`` + ``report.html``). The base is evaluated once, with the adapters disabled; each adapter
is evaluated, compared with the base (paired tests), run through the bias suite and the forgetting check,
and its gates are recorded as a ``gate.verdict`` ledger event that serving and publishing obey.
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..decoding import BASE, Decoder
from ..decoding.lora import adapter_selector
from ..decoding.packed import decode_weights
from ..errors import InputError
from ..ledger import Artifact
from ..ledger.clearance import record_verdict
from ..progress import Progress
from ..workspace import Workspace
from . import bias as bias_mod
from .evalset import EvalSet, load_eval_set
from .forgetting import forgetting, general_text, text_perplexity
from .gates import apply_gates, verdict
from .generation import generate_seqs, score_labels
from .metrics import METRICS, Scored, exact_match, label_report, normalize, rouge_l, token_f1
from .report import write_report
from .schema import REPORT_FORMAT, read_report  # the report's contract
from .stats import (
    bootstrap_ci,
    by_group,
    demographic_parity_difference,
    equalized_odds_difference,
    mcnemar_exact,
    paired_bootstrap,
)
from .suite import Suite, load_suite


def run_date(run_id: str) -> str:
    """``evaluate-20261201T090000-ab12cd`` -> ``2026-12-01`` (the UTC date the run started)."""
    stamp = run_id.split("-")[1]
    return f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}"


def _metrics_for(suite: Suite, es: EvalSet) -> list[str]:
    if suite.metrics:
        bad = [m for m in suite.metrics if METRICS[m] == "label" and es.task != "classification"]
        if bad:
            raise InputError(
                f"metrics {bad} need a classification dataset; {es.artifact.ref} is {es.schema}",
                field="metrics",
                hint="use exact_match, token_f1 or rouge_l",
            )
        return list(suite.metrics)
    return ["accuracy", "macro_f1"] if es.task == "classification" else ["exact_match", "token_f1", "rouge_l"]


class _Answerer:
    """How one model answers a list of prompts for this task (labels, or free text), through the serving
    decoder with every row on LoRA slot ``adapter`` (``decoding.BASE`` for the base)."""

    def __init__(
        self, model, tok, suite: Suite, es: EvalSet, progress: Progress | None, adapters=None, adapter: str = BASE
    ):
        self.model, self.tok, self.suite, self.es, self.progress = model, tok, suite, es, progress
        self.adapters, self.adapter = adapters, adapter
        self.last_tokens: list[list[int]] | None = None
        self._decoder: Decoder | None = None

    def decoder(self) -> Decoder:
        """One decoder for every call (test set, bias variants): its prefix cache (``decoding/prefix.py``)
        then holds the suite's shared system turn and each example, which its bias variants start with."""
        if self._decoder is None:
            self._decoder = Decoder(self.model, self.tok, self.adapters, max_batch=self.suite.batch_size)
        return self._decoder

    def __call__(self, prompts: list, description: str) -> tuple[list[str], list[str] | None]:
        s, es = self.suite, self.es
        if es.task == "classification" and s.scoring == "constrained":
            preds, _ = score_labels(
                self.model,
                self.tok,
                prompts,
                es.labels,
                batch_size=s.batch_size,
                progress=self.progress,
                description=description,
                adapters=self.adapters,
                adapter=self.adapter,
                best_only=True,  # the predictions are what is reported
                decoder=self.decoder(),
            )
            self.last_tokens = None
            return preds, preds
        seqs = generate_seqs(
            self.model,
            self.tok,
            prompts,
            max_new_tokens=s.max_new_tokens,
            stop=s.stop,
            batch_size=s.batch_size,
            progress=self.progress,
            description=description,
            adapters=self.adapters,
            adapter=self.adapter,
            decoder=self.decoder(),
        )
        self.last_tokens = [list(q.ids) for q in seqs]
        return [q.answer for q in seqs], None


def _bias_score(primary: str) -> Callable[[str, str], float]:
    return {
        "accuracy": lambda a, g: float(a == g),
        "macro_f1": lambda a, g: float(a == g),
        "exact_match": exact_match,
        "token_f1": token_f1,
        "rouge_l": rouge_l,
    }[primary]


def _evaluate_subject(
    name: str, answer: _Answerer, es: EvalSet, suite: Suite, metrics: list[str], base: Scored | None, categories
) -> tuple[dict, Scored]:
    bs = suite.bootstrap
    texts, preds = answer([e.messages for e in es.examples], f"{name}: {len(es.examples)} examples")
    scored = Scored(texts, [e.target for e in es.examples], es.labels, preds)
    n = len(es.examples)
    res: dict = {"name": name, "metrics": {}, "answers": texts}
    # per example: right (score 1) or not, by accuracy for labels, else by the primary text metric
    res["correct"] = [x >= 1.0 for x in scored.per_example("accuracy" if es.task == "classification" else metrics[0])]
    if es.task == "classification":
        res["labels"] = label_report(scored.preds, scored.golds, es.labels)
    if answer.last_tokens is not None:
        res["answer_tokens"] = answer.last_tokens  # what parity replays token for token
    for m in metrics:
        res["metrics"][m] = {
            "value": scored.metric(m),
            "ci": list(bootstrap_ci(lambda idx, m=m: scored.metric(m, idx), n, bs.samples, bs.seed, bs.confidence)),
            "n": n,
        }
    if es.has_groups:
        res["groups"] = {m: by_group(lambda idx, m=m: scored.metric(m, idx), es.groups) for m in metrics}
        if es.task == "classification":
            res["fairness"] = {
                "demographic_parity_difference": demographic_parity_difference(scored.preds, scored.golds, es.groups),
                "equalized_odds_difference": equalized_odds_difference(scored.preds, scored.golds, es.groups),
            }
    if base is not None:
        res["vs_base"] = {
            m: paired_bootstrap(
                lambda idx, m=m: base.metric(m, idx),
                lambda idx, m=m: scored.metric(m, idx),
                n,
                bs.samples,
                bs.seed,
                bs.confidence,
            )
            for m in metrics
        }
        if es.task == "classification":
            res["vs_base"]["mcnemar"] = mcnemar_exact(
                [p == g for p, g in zip(base.preds, base.golds)], [p == g for p, g in zip(scored.preds, scored.golds)]
            )
    if categories is not None:
        is_label = es.task == "classification"
        # a variant equal to its example (a swap to the example's own group) is not answered twice
        known = {json.dumps(e.messages, sort_keys=True): t for e, t in zip(es.examples, texts)}

        def predict(prompts):
            keys = [json.dumps(p, sort_keys=True) for p in prompts]
            todo = {k: p for k, p in zip(keys, prompts) if k not in known}
            if todo:
                out, _ = answer(list(todo.values()), f"{name}: bias")
                known.update(zip(todo, out))
            return [known[k] if is_label else normalize(known[k]) for k in keys]

        res["bias"] = bias_mod.counterfactual_suite(
            es.examples,
            predict,
            _bias_score(metrics[0]),
            categories,
            templates=suite.bias.templates,
            max_examples=suite.bias.max_examples,
        )
    return res, scored


def _load_adapters(model, ws: Workspace, adapters: list[Artifact]):
    from peft import PeftModel

    peft = None
    for i, art in enumerate(adapters):
        path = ws.store.materialize(art.digest)
        if peft is None:
            peft = PeftModel.from_pretrained(model, path, adapter_name=f"a{i}", is_trainable=False)
        else:
            peft.load_adapter(path, adapter_name=f"a{i}", is_trainable=False)
    if peft is not None:
        peft.eval()
    return peft


def _check_bases(base_art: Artifact, ad_arts: list[Artifact]) -> None:
    """InputError unless every adapter was trained on ``base_art`` (or does not say)."""
    for a in ad_arts:
        want = (a.metadata or {}).get("base_model")
        if want and want != base_art.digest:
            raise InputError(
                f"adapter {a.ref} was trained on {want}, not on {base_art.ref} ({base_art.digest})",
                hint="pass --model with the adapter's base model",
            )


def _bias_categories(suite: Suite) -> dict | None:
    """The bias suite's word-list categories (None when the bias suite is off); InputError on unknown ones."""
    if not suite.bias.enabled:
        return None
    allc = bias_mod.load_wordlists(suite.bias.wordlists)
    wanted = suite.bias.categories or list(allc)
    unknown = [c for c in wanted if c not in allc]
    if unknown:
        raise InputError(
            f"unknown word-list categories {unknown}", field="bias.categories", hint=f"one of {', '.join(allc)}"
        )
    return {c: allc[c] for c in wanted}


def _report(
    run_id: str,
    suite: Suite,
    suite_digest: str,
    es: EvalSet,
    base_art: Artifact,
    quant,
    metrics: list[str],
    subjects: list[dict],
    weights: str,
) -> dict:
    """The ``report.json`` document of a compare run. ``weights``: the precision the answers were
    computed with (``decoding.packed.decode_weights``: fp16 storage with fp32 compute on CPUs)."""
    return {
        "format": REPORT_FORMAT,
        "run_id": run_id,
        "date": run_date(run_id),
        "suite": suite.to_dict(),
        "suite_digest": suite_digest,
        "dataset": {
            "digest": es.artifact.digest,
            "ref": es.artifact.ref,
            "split": es.split,
            "schema": es.schema,
            "labels": es.labels,
            "n": len(es.examples),
        },
        "base_model": {
            "digest": base_art.digest,
            "ref": base_art.ref,
            "quantization": quant,
            "decode_weights": weights,
        },
        "metrics": metrics,
        "primary_metric": metrics[0],
        "task": es.task,
        "models": subjects,
        "examples": [
            {"i": i, "id": e.id, "group": e.group, "prompt": e.messages[-1]["content"], "gold": e.target}
            for i, e in enumerate(es.examples)
        ],
    }


def compare(
    ws: Workspace,
    model_ref: str,
    adapters: list[str],
    data_ref: str,
    suite: Suite | str | Path | None = None,
    name: str | None = None,
    progress: Progress | None = None,
    quantized_base: bool = True,
) -> Artifact:
    """Evaluate the base and each adapter on the same examples; one report, one verdict per adapter.

    Adapters trained on a quantised base (QLoRA, 8-bit) are evaluated on that base unless
    ``quantized_base`` is False; the report's ``base_model.quantization`` says which.
    """
    from ..models import load_model
    from ..models.quant import adapters_quantization

    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    base_art = ws.ledger.resolve(model_ref, kind="base_model")
    ad_arts = [ws.ledger.resolve(a, kind="adapter") for a in adapters]
    _check_bases(base_art, ad_arts)
    quant = adapters_quantization(ad_arts) if quantized_base else None  # the base they were trained on
    es = load_eval_set(ws, data_ref, suite.split, suite.limit)
    metrics = _metrics_for(suite, es)
    categories = _bias_categories(suite)
    suite_digest = ws.store.put_bytes(suite.canonical())
    config = {
        "suite": suite.to_dict(),
        "suite_digest": suite_digest,
        "model": base_art.digest,
        "adapters": [a.digest for a in ad_arts],
        "dataset": es.artifact.digest,
        "split": es.split,
        "metrics": metrics,
        **({"base_quantization": quant} if quant else {}),
    }
    inputs = [base_art.digest, *[a.digest for a in ad_arts], es.artifact.digest, suite_digest]
    with ws.ledger.run("evaluate", config, inputs=inputs, seed=suite.bootstrap.seed) as run:
        model, tok, _ = load_model(ws, base_art.digest, quantization=quant)
        peft = _load_adapters(model, ws, ad_arts)
        lm = peft if peft is not None else model
        sel = adapter_selector(lm, "gathered", [f"a{i}" for i in range(len(ad_arts))])
        fg_texts = general_text(suite.forgetting.text_file) if suite.forgetting.enabled and ad_arts else None
        answer = _Answerer(lm, tok, suite, es, progress, sel, BASE)
        subjects = []
        base_res, base_scored = _evaluate_subject(
            "base", answer, es, suite, metrics, None, categories if not ad_arts else None
        )
        ppl = functools.partial(text_perplexity, lm, tok, fg_texts, suite.batch_size, answer.decoder())
        base_ppl = ppl(BASE) if fg_texts else None  # every row on slot 0: the base
        base_res.update(model=base_art.digest, adapter=None, ref=base_art.ref)
        subjects.append(base_res)
        for i, art in enumerate(ad_arts):
            peft.set_adapter(f"a{i}")
            res, _ = _evaluate_subject(
                art.ref,
                _Answerer(peft, tok, suite, es, progress, sel, f"a{i}"),
                es,
                suite,
                metrics,
                base_scored,
                categories,
            )
            if fg_texts:
                res["forgetting"] = forgetting(base_ppl, ppl(f"a{i}"))
            res.update(model=base_art.digest, adapter=art.digest, ref=art.ref)
            subjects.append(res)
        for res in subjects[1:] if ad_arts else subjects:
            rows = apply_gates(suite.gates, res, metrics[0]) if not suite.gates.empty() else []
            res["gates"] = rows
            res["passed"] = verdict(rows)
        report = _report(run.id, suite, suite_digest, es, base_art, quant, metrics, subjects, decode_weights(model))
        with tempfile.TemporaryDirectory() as tmp:
            write_report(report, Path(tmp))
            digest = ws.store.put_dir(tmp)
        gated = [s for s in subjects if s.get("adapter")]
        art = run.output(
            "eval_report",
            digest,
            name=name or f"eval-{(es.artifact.name or 'dataset')}",
            metadata={
                "format": REPORT_FORMAT,
                "dataset": es.artifact.digest,
                "split": es.split,
                "base_model": base_art.digest,
                "adapters": [a.digest for a in ad_arts],
                "suite": suite_digest,
                "passed": {s["ref"]: s.get("passed") for s in gated},
                "metrics": {s["ref"]: {m: s["metrics"][m]["value"] for m in metrics} for s in subjects},
            },
        )
        for s in subjects:
            for m in metrics:
                run.metrics[f"{s['ref']}/{m}"] = s["metrics"][m]["value"]
        for s in gated:
            record_verdict(ws.ledger, s["adapter"], digest, s["passed"], s["gates"], run_id=run.id)
    return art


def evaluate(
    ws: Workspace,
    model_ref: str,
    data_ref: str,
    adapter_ref: str | None = None,
    suite: Suite | str | Path | None = None,
    name: str | None = None,
    progress: Progress | None = None,
    quantized_base: bool = True,
) -> Artifact:
    """Evaluate ``model_ref`` (and ``adapter_ref`` against it) on ``data_ref``; returns the eval_report."""
    return compare(ws, model_ref, [adapter_ref] if adapter_ref else [], data_ref, suite, name, progress, quantized_base)


def load_report(ws: Workspace, ref: str) -> dict:
    """The ``report.json`` of a recorded eval_report (name, name@N or digest), checked against
    ``schema.EvalReport``; ``read_report`` gives the typed model."""
    return read_report(ws, ref).to_dict()
