"""The end-of-pipeline summary: one line per stage (ran/cached, seconds, key figures) and the paths."""

from __future__ import annotations

from .runner import PipelineResult

SHOWN = {  # the figures worth a glance, per stage, in this order
    "data": ("rows", "n_train", "n_validation", "n_test"),
    "train": ("steps", "final_loss", "val_loss", "tokens_per_s", "resumed_from_step"),
    "evaluate": (None,),  # every base_/tuned_ metric, flip_rate, gates
    "docs": ("documents", "intended_use_missing"),
    "approve": ("approved_by",),
    "deploy": ("mode", "provenance_id"),
}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def key_figures(stage: str, metrics: dict) -> str:
    keys = SHOWN.get(stage, ())
    if keys == (None,):
        keys = tuple(k for k in metrics if k.startswith(("base_", "tuned_"))) + ("flip_rate", "gates")
    return "  ".join(f"{k}={_fmt(metrics[k])}" for k in keys if k in metrics)


def render(result: PipelineResult) -> list[str]:
    """The summary as lines of text (the CLI prints them; ``--json`` prints ``result.to_dict()``)."""
    lines = [
        f"pipeline {result.name}  run {result.run_id}  {result.seconds:.1f}s",
        "",
        f"{'stage':<9} {'status':<11} {'time':>8}  key figures",
        f"{'-' * 9} {'-' * 11} {'-' * 8}  {'-' * 40}",
    ]
    for s in result.stages:
        t = f"{s.seconds:.1f}s" if s.status in ("ran", "cached", "failed") else ""
        lines.append(f"{s.stage:<9} {s.status:<11} {t:>8}  {key_figures(s.stage, s.metrics)}")
    dep = result.state.get("deploy") or {}
    if dep.get("answer") is not None:
        lines += [
            "",
            f"answer: {dep['answer']!r}",
            f"provenance id: {dep.get('provenance_id')} (finetrace provenance {dep.get('provenance_id')})",
        ]
    if result.paths:
        lines.append("")
        for label, key in (
            ("HTML eval report", "eval_report"),
            ("model card", "model_card"),
            ("documents", "documents"),
        ):
            if key in result.paths:
                lines.append(f"{label + ':':<18} {result.paths[key]}")
    if result.error:
        lines += ["", f"stopped: {result.error}"]
    return lines
