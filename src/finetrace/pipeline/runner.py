"""``run_pipeline``: run the stages in order, skipping each one whose cache key matches a recorded run.

    from finetrace.pipeline import run_pipeline
    result = run_pipeline(ws, "examples/clauses/pipeline.yaml")          # -> PipelineResult
    result = run_pipeline(ws, path, force=["train"], until="evaluate")

The whole pipeline is itself a ``pipeline`` run in the ledger; each stage appends a ``pipeline.stage``
event inside it (see ``cache.py``). A failed gate raises ``GateFailedError`` after the evaluate stage
(the pipeline run is recorded as failed); the partial result travels on the exception as
``exc.pipeline_result`` so that the CLI can still print the summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, FinetraceError
from ..progress import Progress
from ..workspace import Workspace
from . import cache
from .config import STAGES, PipelineConfig, check_files, load_pipeline
from .stages import STAGE_TABLE, Context, check_gates, enabled, export_files


@dataclass
class StageResult:
    stage: str
    status: str  # ran | cached | skipped | failed | interrupted | not reached
    seconds: float = 0.0
    cache_key: str | None = None
    metrics: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    stage_runs: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class PipelineResult:
    name: str
    run_id: str | None = None
    stages: list[StageResult] = field(default_factory=list)
    state: dict = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    def stage(self, name: str) -> StageResult:
        return next(s for s in self.stages if s.stage == name)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "run_id": self.run_id,
            "seconds": round(self.seconds, 2),
            "error": self.error,
            "state": self.state,
            "paths": {k: str(v) for k, v in self.paths.items()},
            "stages": [s.__dict__ for s in self.stages],
        }


def _check_stages(names, what: str) -> list[str]:
    out = []
    for n in names:
        if n == "all":
            out += list(STAGES)
        elif n not in STAGES:
            raise ConfigError(f"unknown stage {n!r}", field=what, hint=f"one of {', '.join(STAGES)} (or all)")
        else:
            out.append(n)
    return out


def run_pipeline(
    ws: Workspace,
    pipeline: str | Path | PipelineConfig,
    force: list[str] = (),
    until: str | None = None,
    progress: Progress | None = None,
    echo: Callable[[str], None] = print,
) -> PipelineResult:
    """Run ``pipeline`` (a YAML path or a loaded config) in ``ws``; return what each stage did.

    ``force``: stages to run even when cached ("all" for every stage). ``until``: stop after this stage.
    Raises ConfigError for a bad pipeline file, GateFailedError when a gate fails, and whatever a stage
    raises (its message names the file/field); the partial result is on ``exc.pipeline_result``.
    """
    cfg = pipeline if isinstance(pipeline, PipelineConfig) else load_pipeline(pipeline)
    check_files(cfg)  # every named file, before the first stage runs
    forced = set(_check_stages(force, "--force"))
    last = _check_stages([until], "--until")[0] if until else STAGES[-1]
    ctx = Context(ws, cfg, progress=progress, echo=echo)
    result = PipelineResult(cfg.name)
    t_start = time.monotonic()
    run_config = {
        "pipeline": cfg.model_dump(mode="json", by_alias=True),
        "file": str(pipeline) if not isinstance(pipeline, PipelineConfig) else None,
        "force": sorted(forced),
        "until": until,
    }
    current = None
    try:
        with ws.ledger.run("pipeline", config=run_config) as prun:
            result.run_id = prun.id
            reached = True
            for name in STAGES:
                current = name
                if not reached:
                    result.stages.append(StageResult(name, "not reached"))
                    continue
                if not enabled(cfg, name):
                    result.stages.append(StageResult(name, "skipped"))
                else:
                    result.stages.append(_run_stage(ctx, prun, name, name in forced))
                    if name == "evaluate":
                        result.stage(name).metrics["gates"] = check_gates(ctx)
                if name == last:
                    reached = False
            prun.metrics.update(
                {
                    "ran": [s.stage for s in result.stages if s.status == "ran"],
                    "cached": [s.stage for s in result.stages if s.status == "cached"],
                    "seconds": round(time.monotonic() - t_start, 2),
                }
            )
            result.paths = export_files(ctx)
    except (FinetraceError, KeyboardInterrupt) as exc:
        result.error = str(exc) or type(exc).__name__
        done = {s.stage for s in result.stages}
        if current and current not in done:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            result.stages.append(StageResult(current, status, error=result.error))
        result.stages += [StageResult(n, "not reached") for n in STAGES if n not in done and n != current]
        result.state, result.seconds = dict(ctx.state), time.monotonic() - t_start
        try:
            result.paths = export_files(ctx)
        except Exception:  # noqa: BLE001 - the summary is best effort; the original error matters
            pass
        exc.pipeline_result = result
        raise
    result.state, result.seconds = dict(ctx.state), time.monotonic() - t_start
    return result


def _run_stage(ctx: Context, prun, name: str, forced: bool) -> StageResult:
    stage = STAGE_TABLE[name]
    ws = ctx.ws
    t0 = time.monotonic()
    config, inputs = stage.plan(ctx)
    key = cache.cache_key(name, config, inputs)
    hit = None if forced else cache.lookup(ws, name, key)
    base = {"stage": name, "cache_key": key, "inputs": inputs}
    if hit is not None:
        stage.absorb(ctx, hit["outputs"])
        res = StageResult(
            name,
            "cached",
            time.monotonic() - t0,
            key,
            dict(hit.get("metrics") or {}),
            hit["outputs"],
            list(hit.get("stage_runs") or []),
        )
        prun.event(
            cache.EVENT,
            {
                **base,
                "status": "cached",
                "reused_from": hit.get("run_id"),
                "outputs": hit["outputs"],
                "metrics": res.metrics,
                "stage_runs": res.stage_runs,
                "seconds": round(res.seconds, 3),
            },
        )
        ctx.echo(f"{name}: cached (key {key[7:19]}, from {hit.get('run_id')})")
        return res
    resume = name == "train" and cache.was_interrupted(ws, name, key)
    ctx.echo(f"{name}: running" + (" (forced)" if forced else ""))
    prun.event(cache.EVENT, {**base, "status": "started"})
    try:
        out = stage.execute(ctx, resume)
    except KeyboardInterrupt:
        raise  # the "started" event stays the last one for this key: the next run resumes
    except BaseException as exc:
        msg = str(exc) if isinstance(exc, FinetraceError) else f"{type(exc).__name__}: {exc}"
        prun.event(
            cache.EVENT, {**base, "status": "failed", "error": msg[:2000], "seconds": round(time.monotonic() - t0, 3)}
        )
        raise
    stage.absorb(ctx, out.outputs)
    res = StageResult(name, "ran", time.monotonic() - t0, key, out.metrics, out.outputs, out.stage_runs)
    prun.event(
        cache.EVENT,
        {
            **base,
            "status": "ran",
            "outputs": out.outputs,
            "metrics": out.metrics,
            "stage_runs": out.stage_runs,
            "seconds": round(res.seconds, 3),
        },
    )
    return res
