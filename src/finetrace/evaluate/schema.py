"""The eval report's contract: ``report.json`` as typed pydantic models, the one way every reader reads it.

    rep = EvalReport.parse(json.loads(text), source="report.json")   # InputError naming the field
    rep.primary_metric, rep.base, rep.tuned, rep.subject(adapter_digest), rep.value("tuned", "accuracy")

``runner.compare`` writes the report as a plain dict (``report.json`` is canonical, sorted JSON); this
module is what the pipeline, the market client, the audit documents, the CLI, parity and the console
read it through. Every model allows extra keys, so a report from a newer finetrace still loads here, and
fields added after the first reports (``correct``, ``answer_tokens``, ``labels``, ``date``, an example's
``prompt``) have defaults, so older reports load too. ``to_dict()`` gives back the JSON shape (for
templates), including any extra keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InputError

if TYPE_CHECKING:
    from ..workspace import Workspace

REPORT_FORMAT = "finetrace-eval-report/1"


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())

    def to_dict(self, **kw: Any) -> dict[str, Any]:
        """The JSON shape as it was read (extra keys kept, no defaults added); ``kw``: include/exclude."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True, **kw)


class MetricValue(_Part):
    """One metric of one model: the value, its bootstrap interval ``[lo, hi]`` and the example count."""

    value: float
    ci: list[float] = Field(default_factory=list)
    n: int | None = None


class Comparison(_Part):
    """One entry of ``vs_base``: a paired bootstrap (``delta``, ``ci``, ``p_value``) or McNemar (``b``, ``c``)."""

    test: str | None = None
    p_value: float | None = None
    delta: float | None = None
    ci: list[float] | None = None


class GateRow(_Part):
    """One gate of one adapter: ``value op threshold`` and whether it passed (``value`` None: not measured)."""

    name: str
    value: float | None = None
    threshold: float
    op: str
    passed: bool
    note: str = ""


class BiasCategory(_Part):
    n_examples: int = 0
    flip_rate: float = 0.0
    gap: float = 0.0
    groups: dict[str, dict[str, Any]] = Field(default_factory=dict)
    pairs: list[dict[str, Any]] = Field(default_factory=list)


class BiasResult(_Part):
    """The counterfactual suite of one model (see ``bias.counterfactual_suite``)."""

    flip_rate: float = 0.0
    group_gap: float = 0.0
    categories: dict[str, BiasCategory] = Field(default_factory=dict)
    worst_pairs: list[dict[str, Any]] = Field(default_factory=list)


class Forgetting(_Part):
    base_perplexity: float
    tuned_perplexity: float
    increase: float | None = None


class ModelResult(_Part):
    """One evaluated model (``models[i]``): the base (``adapter`` None) or the base with one adapter."""

    name: str = ""
    ref: str
    model: str | None = None
    adapter: str | None = None
    metrics: dict[str, MetricValue]
    answers: list[str] = Field(default_factory=list)
    correct: list[bool] | None = None
    answer_tokens: list[list[int]] | None = None
    labels: dict[str, Any] | None = None
    groups: dict[str, dict[str, Any]] | None = None
    fairness: dict[str, Any] | None = None
    vs_base: dict[str, Comparison] | None = None
    bias: BiasResult | None = None
    forgetting: Forgetting | None = None
    gates: list[GateRow] = Field(default_factory=list)
    passed: bool | None = None

    def values(self) -> dict[str, float]:
        """``{metric: value}``."""
        return {k: v.value for k, v in self.metrics.items()}

    def failed_gates(self) -> list[GateRow]:
        return [g for g in self.gates if not g.passed]


class DatasetInfo(_Part):
    digest: str
    ref: str
    split: str
    schema_: str | None = Field(default=None, alias="schema")
    labels: list[str] | None = None
    n: int


class BaseModelInfo(_Part):
    digest: str
    ref: str
    quantization: dict[str, Any] | None = None
    decode_weights: str | None = None  # "fp16" (storage; fp32 compute) or "fp32": see decoding/packed.py


class Bootstrap(_Part):
    confidence: float = 0.95


class SuiteInfo(_Part):
    """The suite as recorded (``Suite.to_dict()``); only what readers use is typed."""

    name: str
    scoring: str = "constrained"
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 64
    stop: list[str] = Field(default_factory=list)
    bootstrap: Bootstrap = Field(default_factory=Bootstrap)


class ExampleRow(_Part):
    i: int
    id: str | int | None = None  # the dataset's own row id, as the data gave it
    group: str | int | None = None
    prompt: str = ""
    gold: str


class EvalReport(_Part):
    """``report.json`` of one ``evaluate`` run: the base first, then each adapter, on the same examples."""

    format: str = REPORT_FORMAT
    run_id: str
    date: str | None = None
    suite: SuiteInfo
    suite_digest: str | None = None
    dataset: DatasetInfo
    base_model: BaseModelInfo
    metrics: list[str]
    primary_metric: str
    task: str | None = None
    models: list[ModelResult]
    examples: list[ExampleRow] = Field(default_factory=list)

    @classmethod
    def parse(cls, data: Any, source: str = "report.json") -> EvalReport:
        """Validate a decoded ``report.json``; InputError naming ``source`` and the first bad field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or None
            raise InputError(
                f"not an eval report: {err['msg']} ({len(exc.errors())} problem(s))",
                file=source,
                field=field,
                hint="pass the report.json an evaluate run wrote",
            ) from None

    @property
    def base(self) -> ModelResult | None:
        """The base model's result (the entry without an adapter)."""
        return next((m for m in self.models if not m.adapter), None)

    @property
    def tuned(self) -> list[ModelResult]:
        """The adapters' results, in the order they were evaluated."""
        return [m for m in self.models if m.adapter]

    @property
    def last(self) -> ModelResult:
        """The last model evaluated: the adapter of an ``evaluate`` run, else the base."""
        return self.models[-1]

    def subject(self, adapter: str) -> ModelResult | None:
        """The result of the adapter with this digest."""
        return next((m for m in self.models if m.adapter == adapter), None)

    @property
    def confidence(self) -> float:
        return self.suite.bootstrap.confidence

    def to_dict(self, examples: bool = True) -> dict[str, Any]:  # type: ignore[override]
        """The JSON shape as it was read (extra keys kept, no defaults added); without ``examples`` if asked."""
        return super().to_dict(exclude={"examples"} if not examples else None)


def read_report(ws: Workspace, ref: str) -> EvalReport:
    """The typed ``report.json`` of a recorded eval_report (name, name@N or digest)."""
    import json

    art = ws.ledger.resolve(ref, kind="eval_report")
    path = ws.store.materialize(art.digest) / "report.json"
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"eval report {art.ref} has no readable report.json: {exc}", file="report.json") from None
    return EvalReport.parse(data, source=f"{art.ref}/report.json")
