"""The pipeline: one YAML file from raw data to a served, documented, verified model, cached by digest.

    from finetrace.pipeline import load_pipeline, run_pipeline
    result = run_pipeline(ws, "examples/clauses/pipeline.yaml")     # `finetrace run PIPELINE.yaml`

Stages, in order: model -> data -> train -> evaluate (gates) -> docs -> approve (optional) -> deploy.
Each calls one stage's public entry point; each is skipped when its cache key (its resolved config and
its inputs' digests) matches a recorded run, and its outputs are reused.

File structure::

    config.py    PipelineConfig (pydantic) and load_pipeline: YAML -> typed config, errors with file/line
    cache.py     cache keys and the ``pipeline.stage`` ledger events that hold them
    stages.py    plan / execute / absorb of each stage; the gate check; GateFailedError
    runner.py    run_pipeline: the stages in order inside one ``pipeline`` run
    summary.py   the end-of-run table
"""

from .config import STAGES, PipelineConfig, load_pipeline
from .runner import PipelineResult, StageResult, run_pipeline
from .stages import GateFailedError

__all__ = [
    "STAGES",
    "GateFailedError",
    "PipelineConfig",
    "PipelineResult",
    "StageResult",
    "load_pipeline",
    "run_pipeline",
]
