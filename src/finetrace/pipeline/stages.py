"""The pipeline's stages, each a thin call of one stage's public entry point.

Every stage is a ``Stage`` with three parts:

    plan(ctx)            -> (config, inputs)    what the cache key is made of (inputs: name -> digest)
    execute(ctx, resume) -> StageOutput         do the work through the stage's public entry point
    absorb(ctx, outputs)                        put the outputs (fresh or cached) into ``ctx.state``

so that the runner can skip a stage whose key matches and still hand its outputs downstream.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FinetraceError, InputError, NotFoundError
from ..progress import Progress
from ..workspace import Workspace
from .config import PipelineConfig


class GateFailedError(FinetraceError):
    """The tuned adapter failed an eval gate (and no named person overrode it): the pipeline stops."""

    exit_code = 4


@dataclass
class Context:
    ws: Workspace
    cfg: PipelineConfig
    progress: Progress | None = None  # a finetrace.progress callback (the CLI draws it)
    echo: Callable[[str], None] = print
    state: dict = field(default_factory=dict)  # stage outputs, as digests and small facts

    @property
    def out_dir(self) -> Path:
        """Where the documents and the HTML report of this pipeline are copied (inside the workspace)."""
        return self.ws.root / "reports" / self.cfg.name


@dataclass
class StageOutput:
    outputs: dict  # JSON-able; "artifacts": digests recorded by the stage
    metrics: dict = field(default_factory=dict)  # the key figures shown in the summary
    stage_runs: list[str] = field(default_factory=list)


def _run_metrics(ws: Workspace, run_id: str | None, keys: tuple[str, ...]) -> dict:
    if not run_id:
        return {}
    m = ws.ledger.get_run(run_id).metrics or {}
    return {k: m[k] for k in keys if m.get(k) is not None}


# -- model ------------------------------------------------------------------------------------------
def _model_source(ctx: Context) -> tuple[str, Path | None]:
    src = ctx.cfg.model.source
    p = ctx.cfg.path(src)
    if p is not None and p.exists():
        return str(p), p
    return src, None


def plan_model(ctx: Context):
    src, path = _model_source(ctx)
    from .cache import file_digest

    inputs = {"source": file_digest(path)} if path else {}
    return {"source": ctx.cfg.model.source if path is None else path.name, "name": ctx.cfg.model.name}, inputs


def execute_model(ctx: Context, resume: bool) -> StageOutput:
    from ..models import add_model

    src, _ = _model_source(ctx)
    art = add_model(ctx.ws, src, name=ctx.cfg.model.name)
    return StageOutput(
        {"artifacts": [art.digest], "base_model": art.digest}, stage_runs=[art.run_id] if art.run_id else []
    )


def absorb_model(ctx: Context, out: dict) -> None:
    ctx.state["base_model"] = out["base_model"]


# -- data -------------------------------------------------------------------------------------------
def _data_paths(ctx: Context) -> dict[str, Path]:
    d = ctx.cfg.data
    paths = {f"file:{f}": ctx.cfg.path(f) for f in d.files}
    if d.test_file:
        paths[f"test_file:{d.test_file}"] = ctx.cfg.path(d.test_file)
    if d.datasheet:
        paths[f"datasheet:{d.datasheet}"] = ctx.cfg.path(d.datasheet)
    for key, p in paths.items():
        if not p.is_file():
            raise NotFoundError(
                f"data.{key.split(':', 1)[0]}: no such file: {p}",
                hint="paths in a pipeline file are relative to the pipeline file's folder",
            )
    return paths


PIPELINE_DATA_HINT = (
    "in the pipeline file: data.mapping: {label: YOUR_COLUMN} renames a column, "
    "data.on_error: skip drops invalid rows, data.schema sets the schema"
)


def plan_data(ctx: Context):
    from .cache import file_digest

    inputs = {k: file_digest(p) for k, p in _data_paths(ctx).items()}
    return ctx.cfg.data.model_dump(mode="json", by_alias=True, exclude={"workers"}), inputs


def execute_data(ctx: Context, resume: bool) -> StageOutput:
    from ..data import import_dataset

    d = ctx.cfg.data
    try:
        art = import_dataset(
            ctx.ws,
            [ctx.cfg.path(f) for f in d.files],
            d.name,
            d.options(),
            datasheet=ctx.cfg.path(d.datasheet),
            test_file=ctx.cfg.path(d.test_file),
        )
    except InputError as exc:  # the importer speaks in CLI flags; say it in pipeline keys too
        exc.hint = "; ".join(filter(None, [exc.hint, PIPELINE_DATA_HINT]))
        raise
    counts = (art.metadata or {}).get("counts") or {}
    metrics = {
        "rows": (art.metadata or {}).get("rows_out"),
        **{f"n_{k}": v for k, v in counts.items() if isinstance(v, int)},
    }
    return StageOutput({"artifacts": [art.digest], "dataset": art.digest}, metrics, [art.run_id] if art.run_id else [])


def absorb_data(ctx: Context, out: dict) -> None:
    ctx.state["dataset"] = out["dataset"]


# -- train ------------------------------------------------------------------------------------------
def train_config(ctx: Context):
    from ..train import TrainConfig

    doc = {**ctx.cfg.train_doc(), "base_model": ctx.state["base_model"], "dataset": ctx.state["dataset"]}
    return TrainConfig.model_validate(doc)


def plan_train(ctx: Context):
    cfg = train_config(ctx).model_dump(mode="json")
    inputs = {"base_model": cfg.pop("base_model"), "dataset": cfg.pop("dataset")}
    return cfg, inputs


def execute_train(ctx: Context, resume: bool) -> StageOutput:
    from ..train import train

    cfg = train_config(ctx)
    if resume:
        ctx.echo("train: resuming the interrupted training run from its last checkpoint")
        try:
            art = train(ctx.ws, cfg, resume=True, progress=ctx.progress)
        except NotFoundError:
            ctx.echo("train: no checkpoint to resume from; training from the start")
            art = train(ctx.ws, cfg, resume=False, progress=ctx.progress)
    else:
        art = train(ctx.ws, cfg, resume=False, progress=ctx.progress)
    metrics = _run_metrics(ctx.ws, art.run_id, ("steps", "final_loss", "val_loss", "tokens_per_s", "resumed_from_step"))
    return StageOutput({"artifacts": [art.digest], "adapter": art.digest}, metrics, [art.run_id])


def absorb_train(ctx: Context, out: dict) -> None:
    ctx.state["adapter"] = out["adapter"]


# -- evaluate ---------------------------------------------------------------------------------------
def load_suite_of(ctx: Context):
    from ..evaluate import Suite, load_suite

    s = ctx.cfg.evaluate.suite
    if isinstance(s, dict):
        return Suite.model_validate(s) if s else load_suite(None)
    return load_suite(ctx.cfg.path(s) if s else None)


def plan_evaluate(ctx: Context):
    import json

    suite = load_suite_of(ctx)
    return (
        {"suite": json.loads(suite.canonical()), "name": ctx.cfg.evaluate.name},
        {"base_model": ctx.state["base_model"], "adapter": ctx.state["adapter"], "dataset": ctx.state["dataset"]},
    )


def execute_evaluate(ctx: Context, resume: bool) -> StageOutput:
    from ..evaluate import compare

    ws = ctx.ws
    data_ref = ws.ledger.artifact(ctx.state["dataset"]).ref
    rep = compare(
        ws,
        ctx.state["base_model"],
        [ctx.state["adapter"]],
        data_ref,
        load_suite_of(ctx),
        name=ctx.cfg.evaluate.name or f"{ctx.cfg.name}-eval",
        progress=ctx.progress,
    )
    return StageOutput({"artifacts": [rep.digest], "report": rep.digest}, report_metrics(ws, rep.digest), [rep.run_id])


def report_metrics(ws: Workspace, digest: str) -> dict:
    """base/<metric> and tuned/<metric> of the primary metric, bias flip rate, and the gate verdict."""
    from ..evaluate import read_report

    rep = read_report(ws, digest)
    prim = rep.primary_metric
    base, tuned = rep.models[0], rep.last
    out = {f"base_{prim}": base.metrics[prim].value, f"tuned_{prim}": tuned.metrics[prim].value}
    if tuned.bias is not None:
        out["flip_rate"] = tuned.bias.flip_rate
    out["gates_passed"] = tuned.passed
    return out


def absorb_evaluate(ctx: Context, out: dict) -> None:
    ctx.state["report"] = out["report"]


def check_gates(ctx: Context) -> str:
    """Stop with a clear report when the tuned adapter failed a gate (unless a named person overrode it)."""
    from ..evaluate import read_report
    from ..ledger.clearance import clearance

    tuned = read_report(ctx.ws, ctx.state["report"]).last
    if tuned.passed is not False:
        return "passed"
    c = clearance(ctx.ws.ledger, ctx.state["adapter"])
    if c.status == "overridden":
        ctx.echo(f"evaluate: gates failed but were overridden: {c.detail}")
        return "overridden"
    rows = tuned.failed_gates()
    lines = "; ".join(f"{g.name}: {_fmt(g.value)} (needs {g.op} {_fmt(g.threshold)})" for g in rows)
    html = ctx.out_dir / "eval-report.html"  # export_files copies it there before the error is shown
    raise GateFailedError(
        f"the tuned adapter {tuned.ref} failed {len(rows)} eval gate(s): {lines}. Report: {html}",
        hint="improve the data or training and run again, relax the gate in the suite, or record a named "
        f"override: finetrace override {tuned.ref} --as 'Full Name' --reason '...'",
    )


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


# -- docs -------------------------------------------------------------------------------------------
def plan_docs(ctx: Context):
    from .cache import file_digest

    d = ctx.cfg.docs
    inputs = {"adapter": ctx.state["adapter"], "report": ctx.state["report"]}
    if d.intended_use:
        p = ctx.cfg.path(d.intended_use)
        if not p.is_file():
            raise NotFoundError(
                f"docs.intended_use: no such file: {p}",
                hint="paths in a pipeline file are relative to the pipeline file's folder",
            )
        inputs["intended_use"] = file_digest(p)
    return {"formats": list(d.formats)}, inputs


def execute_docs(ctx: Context, resume: bool) -> StageOutput:
    from ..audit import generate_documents

    d = ctx.cfg.docs
    arts = generate_documents(
        ctx.ws, ctx.state["adapter"], intended_use=ctx.cfg.path(d.intended_use), formats=tuple(d.formats)
    )
    docs = {(a.metadata or {}).get("document", a.ref): a.digest for a in arts}
    missing = any((a.metadata or {}).get("intended_use_missing") for a in arts)
    return StageOutput(
        {"artifacts": [a.digest for a in arts], "documents": docs},
        {"documents": len(arts), "intended_use_missing": missing},
        sorted({a.run_id for a in arts if a.run_id}),
    )


def absorb_docs(ctx: Context, out: dict) -> None:
    ctx.state["documents"] = out["documents"]


def export_files(ctx: Context) -> dict[str, Path]:
    """Copy the eval report page and the documents into ``ctx.out_dir``; return the main paths."""
    ws, dest = ctx.ws, ctx.out_dir
    paths: dict[str, Path] = {}
    if ctx.state.get("report"):
        dest.mkdir(parents=True, exist_ok=True)
        src = ws.store.materialize(ctx.state["report"])
        for name in ("report.html", "report.json"):
            if (src / name).is_file():
                shutil.copyfile(src / name, dest / f"eval-{name}")
        paths["eval_report"] = dest / "eval-report.html"
    for doc, digest in (ctx.state.get("documents") or {}).items():
        folder = dest / "documents" / str(doc)
        shutil.copytree(ws.store.materialize(digest), folder, dirs_exist_ok=True)
        paths.setdefault("documents", dest / "documents")
        if str(doc) == "model_card":
            paths["model_card"] = next(iter(sorted(folder.glob("*.html"))), folder)
    return paths


# -- approve ----------------------------------------------------------------------------------------
def plan_approve(ctx: Context):
    a = ctx.cfg.approve
    return {"by": a.by, "note": a.note}, {"adapter": ctx.state["adapter"], "report": ctx.state["report"]}


def execute_approve(ctx: Context, resume: bool) -> StageOutput:
    from ..audit import approve

    a = ctx.cfg.approve
    entry = approve(ctx.ws, ctx.state["adapter"], by=a.by, note=a.note, report_ref=ctx.state["report"])
    return StageOutput({"artifacts": [], "approval_seq": entry.seq}, {"approved_by": a.by})


def absorb_approve(ctx: Context, out: dict) -> None:
    ctx.state["approval_seq"] = out.get("approval_seq")


# -- deploy -----------------------------------------------------------------------------------------
def plan_deploy(ctx: Context):
    d = ctx.cfg.deploy
    return (
        {"mode": d.mode, "ask": d.ask, "max_tokens": d.max_tokens},
        {"base_model": ctx.state["base_model"], "adapter": ctx.state["adapter"], "dataset": ctx.state["dataset"]},
    )


def question_messages(ctx: Context) -> list[dict]:
    """The chat messages sent: ``deploy.ask`` in the dataset's prompt format (default: a test example)."""
    from ..data import iter_examples, open_dataset
    from ..data.schemas import to_example

    _, info, art = open_dataset(ctx.ws, ctx.state["dataset"])
    schema, labels = info.get("schema"), info.get("labels") or None
    ask = ctx.cfg.deploy.ask
    if ask is None:
        for split in ("test", "validation", "train"):
            try:
                ex = next(iter(iter_examples(ctx.ws, art.ref, split)), None)
            except FinetraceError:
                ex = None
            if ex is not None:
                return list(ex.messages)
        raise NotFoundError(f"dataset {art.ref} has no example to ask", hint="set deploy.ask in the pipeline")
    if schema == "classification" and labels:
        return list(to_example({"text": ask, "label": labels[0]}, schema, labels, info.get("prompt_format")).messages)
    return [{"role": "user", "content": ask}]


def parity_gate(
    ws: Workspace,
    adapter_ref: str,
    report: str | None,
    min_agreement: float | None,
    echo,
    engine: str = "native",
    upstream: str | None = None,
):
    """Replay the eval set through the serving path (``serve.parity``) on ``engine``; refuse below ``min_agreement``."""
    from ..serve.parity import require_parity

    res = require_parity(ws, adapter_ref, min_agreement, engine, report_ref=report, upstream=upstream)
    echo(
        f"deploy: parity {res.agreeing}/{res.n} served answers equal the evaluated ones "
        f"({'token-exact' if res.exact else f'{res.agreement:.1%}'}; run {res.run_id})"
    )
    return res


def execute_deploy(ctx: Context, resume: bool) -> StageOutput:
    ws, d = ctx.ws, ctx.cfg.deploy
    adapter_ref = ws.ledger.artifact(ctx.state["adapter"]).ref
    base_ref = ws.ledger.artifact(ctx.state["base_model"]).ref
    par = (
        parity_gate(ws, adapter_ref, ctx.state.get("report"), d.min_serve_agreement, ctx.echo, d.engine, d.upstream)
        if d.parity
        else None
    )
    if d.mode == "record":
        with ws.ledger.run(
            "deploy",
            config={"base": base_ref, "adapters": [adapter_ref], "mode": "record", "pipeline": ctx.cfg.name},
            inputs=[ctx.state["base_model"], ctx.state["adapter"]],
        ) as run:
            pass
        out = StageOutput({"artifacts": [], "deploy_run": run.id}, {"mode": "record"}, [run.id])
    else:
        out = _serve_and_ask(ctx, base_ref, adapter_ref)
    if par is not None:
        out.metrics["serve_agreement"] = par.agreement
        out.stage_runs.insert(0, par.run_id)
    return out


def _serve_and_ask(ctx: Context, base_ref: str, adapter_ref: str) -> StageOutput:
    try:
        import openai
    except ImportError:
        from ..errors import DependencyError

        raise DependencyError(
            "deploy.mode: serve asks its question through the openai client, which is not installed",
            hint="pip install 'openai>=1.40', or set deploy.mode: record",
        ) from None

    from ..serve.provenance import render, resolve
    from ..serve.server import BackgroundServer, build_engine
    from ..serve.settings import ServeSettings

    ws, d = ctx.ws, ctx.cfg.deploy
    messages = question_messages(ctx)
    settings = ServeSettings(port=0, require_eval=True)
    engine = build_engine(ws, base_ref, [adapter_ref], settings, d.engine, d.upstream)
    ctx.echo(
        f"deploy: serving {adapter_ref} on {base_ref} ({d.engine} engine behind the OpenAI-compatible "
        f"gateway on 127.0.0.1)"
    )
    with BackgroundServer(engine, settings) as srv:
        deploy_run = engine.deployment  # stop() below closes the run (failed if this block raises)
        client = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=600)
        reply = client.chat.completions.create(
            model=adapter_ref, messages=messages, max_tokens=d.max_tokens, temperature=0
        )
        answer = reply.choices[0].message.content
        pid = (reply.model_extra or {}).get("provenance_id")
        ctx.echo(f"deploy: asked  {messages[-1]['content']!r}")
        ctx.echo(f"deploy: answer {answer!r}  (provenance id {pid})")
    doc = resolve(ws, pid)  # after stop: the request log has been flushed
    for line in render(doc):
        ctx.echo(f"  {line}")
    train_run = ((doc.get("training_run") or doc.get("train_run") or {}) or {}).get("id")
    return StageOutput(
        {"artifacts": [], "deploy_run": deploy_run, "provenance_id": pid, "answer": answer},
        {"answer": answer, "provenance_id": pid, **({"train_run": train_run} if train_run else {})},
        [r for r in (deploy_run,) if r],
    )


def absorb_deploy(ctx: Context, out: dict) -> None:
    ctx.state["deploy"] = out


@dataclass(frozen=True)
class Stage:
    name: str
    plan: Callable
    execute: Callable
    absorb: Callable


STAGE_TABLE = {
    "model": Stage("model", plan_model, execute_model, absorb_model),
    "data": Stage("data", plan_data, execute_data, absorb_data),
    "train": Stage("train", plan_train, execute_train, absorb_train),
    "evaluate": Stage("evaluate", plan_evaluate, execute_evaluate, absorb_evaluate),
    "docs": Stage("docs", plan_docs, execute_docs, absorb_docs),
    "approve": Stage("approve", plan_approve, execute_approve, absorb_approve),
    "deploy": Stage("deploy", plan_deploy, execute_deploy, absorb_deploy),
}


def enabled(cfg: PipelineConfig, stage: str) -> bool:
    if stage == "docs":
        return cfg.docs is not None
    if stage == "approve":
        return cfg.approve is not None
    if stage == "deploy":
        return cfg.deploy.mode != "none"
    return True
