"""The evaluation suite: what to measure and the gates a model must pass (a typed YAML file).

    name: support-routing
    split: test                 # dataset split to evaluate (DATASET@V:split on the CLI wins)
    metrics: [accuracy, macro_f1]
    scoring: constrained        # classification: score each label | generate and parse the label
    max_new_tokens: 64
    bias: {enabled: true, categories: [gender_names, origin_names], max_examples: 100}
    forgetting: {enabled: true}
    gates:
      min_metric: {accuracy: 0.80}
      min_gain: {accuracy: 0.05}      # tuned - base, absolute
      max_flip_rate: 0.05
      max_group_gap: 0.10             # on the primary (first) metric, over the dataset's group column
      max_perplexity_increase: 0.20   # relative: tuned / base - 1 on the general-text sample

``load_suite(path)`` reads and validates it; an unknown key is a ``ConfigError`` that names the key and
suggests the closest valid one. With no file, ``Suite()`` is the default (metrics chosen by schema, bias
and forgetting on, no gates).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..canonical import canonical_json
from ..yamlfile import read_config, validate_model
from .metrics import METRICS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class BootstrapConfig(_Strict):
    samples: int = Field(
        1000, ge=10, le=1_000_000, description="Bootstrap resamples for every interval and paired test."
    )
    seed: int = Field(0, ge=0, le=2**64 - 1, description="Seed of the resampling RNG (same seed, same intervals).")
    confidence: float = Field(0.95, gt=0, lt=1, description="Interval coverage.")


class BiasConfig(_Strict):
    enabled: bool = Field(True, description="Run the counterfactual suite on each evaluated model.")
    categories: list[str] | None = Field(None, description="Word-list categories to use (default: all).")
    wordlists: list[str] = Field(default_factory=list, description="Extra word-list JSON files to merge in.")
    templates: bool = Field(True, description="Wrap inputs that mention no term in the category's template.")
    max_examples: int | None = Field(
        20, ge=1, le=10_000_000, description="Examples to perturb (the first N of the split)."
    )


class ForgettingConfig(_Strict):
    enabled: bool = Field(True, description="Perplexity on the shipped general-text sample, base vs tuned.")
    text_file: str | None = Field(None, description="Use this file's passages (one per line) instead.")


class Gates(_Strict):
    min_metric: dict[str, float] = Field(default_factory=dict, description="metric -> minimum value.")
    min_gain: dict[str, float] = Field(default_factory=dict, description="metric -> minimum tuned - base.")
    max_flip_rate: float | None = Field(None, ge=0, le=1, description="Maximum counterfactual answer flip rate.")
    max_group_gap: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Maximum max-min of the primary metric across "
        "the dataset's groups and across counterfactual groups.",
    )
    max_perplexity_increase: float | None = Field(None, ge=0, le=1e6, description="Maximum relative perplexity rise.")

    @field_validator("min_metric", "min_gain")
    @classmethod
    def _known(cls, v: dict[str, float]) -> dict[str, float]:
        for k, x in v.items():
            if k not in METRICS:
                raise ValueError(f"unknown metric {k!r}; one of {', '.join(METRICS)}")
            if not -1 <= x <= 1:  # every metric is in [0, 1], so a gain in [-1, 1]
                raise ValueError(f"{k}: {x} can never be met or never fail; metrics are in [0, 1]")
        return v

    def empty(self) -> bool:
        return not (
            self.min_metric
            or self.min_gain
            or self.max_flip_rate is not None
            or self.max_group_gap is not None
            or self.max_perplexity_increase is not None
        )


class Suite(_Strict):
    name: str = Field("default", description="A name for reports.")
    split: str = Field("test", description="Dataset split to evaluate.")
    metrics: list[str] | None = Field(
        None,
        description="Metrics; default by schema (classification: "
        "accuracy, macro_f1; others: exact_match, token_f1, rouge_l).",
    )
    scoring: Literal["constrained", "generate"] = Field("constrained", description="Classification scoring.")
    max_new_tokens: int = Field(64, ge=1, le=100_000, description="Generation budget per answer.")
    stop: list[str] = Field(default_factory=lambda: ["\n\n"], description="Stop strings (cut from answers).")
    batch_size: int = Field(8, ge=1, le=100_000, description="Prompts per forward batch.")
    limit: int | None = Field(None, ge=1, le=100_000_000, description="Evaluate only the first N examples.")
    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig)
    bias: BiasConfig = Field(default_factory=BiasConfig)
    forgetting: ForgettingConfig = Field(default_factory=ForgettingConfig)
    gates: Gates = Field(default_factory=Gates)

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str] | None) -> list[str] | None:
        for k in v or []:
            if k not in METRICS:
                raise ValueError(f"unknown metric {k!r}; one of {', '.join(METRICS)}")
        return v

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def canonical(self) -> bytes:
        return canonical_json(self.to_dict())


def parse_suite(doc: dict, source: str = "<suite>", lines: dict[str, int] | None = None, prefix: str = "") -> Suite:
    """Validate a mapping as a suite; errors name the key (``prefix`` + key, with file and line when known).

    ``lines`` are the dotted-key lines of ``source``, where the suite sits at ``prefix``."""
    return validate_model(
        Suite,
        doc or {},
        "suite",
        file=source,
        lines=lines,
        prefix=prefix,
        reference="see the suite keys in docs/config-reference.md",
    )


def load_suite(path: str | Path | None) -> Suite:
    """Read a suite YAML file; None gives the default suite."""
    if path is None:
        return Suite()
    doc, lines = read_config(path, "suite file")
    return parse_suite(doc, str(path), lines)
