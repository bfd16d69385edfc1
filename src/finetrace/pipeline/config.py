"""The pipeline configuration: one typed model for ``finetrace run PIPELINE.yaml``.

A pipeline names a base model, the data files, a training config, an eval suite with gates, the
documents' intended-use file, an optional named approver and a deployment. Relative paths are relative
to the pipeline file. Errors name the file, line and key, and suggest the closest valid key::

    >>> cfg = load_pipeline("examples/clauses/pipeline.yaml")
    >>> cfg.train_doc()        # the training keys, merged from train.config (a file) and inline keys
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from .. import yamlfile
from ..data.options import ImportOptions
from ..errors import ConfigError

STAGES = ("model", "data", "train", "evaluate", "docs", "approve", "deploy")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelStage(_Strict):
    """The base model: a catalog name, a Hugging Face folder, a ``.gguf`` file or an alias already recorded."""

    source: str = Field(
        ...,
        description="Catalog name (smollm2-135m-instruct), path of an HF folder or a "
        ".gguf file (relative to the pipeline file), or a hub id org/name.",
    )
    name: str | None = Field(
        None, description="Alias to record the base model under (default: derived from the source)."
    )


class DataStage(ImportOptions):
    """The data import (``finetrace data import``): ``name``, ``files`` and every ``ImportOptions`` key."""

    name: str = Field(..., description="Dataset name; each distinct import is a new version name@N.")
    files: list[str] = Field(
        ..., min_length=1, description="Input files (CSV, TSV, JSONL, JSON, Parquet), relative to the pipeline file."
    )

    def options(self) -> ImportOptions:
        return ImportOptions.model_validate(self.model_dump(exclude={"name", "files"}, by_alias=True))


class TrainStage(BaseModel):
    """Training: ``config`` (a train YAML file) and/or inline keys of the train config (they win).

    ``base_model`` and ``dataset`` are filled in by the pipeline; ``output_name`` defaults to
    ``<pipeline name>-lora``. Every other key is a key of the train config (see its reference).
    """

    model_config = ConfigDict(extra="allow")

    config: str | None = Field(
        None,
        description="A train YAML file (finetrace train --print-config shows "
        "every key), relative to the pipeline file.",
    )


class EvaluateStage(_Strict):
    """Evaluation of the base model and the tuned adapter on the same examples, with gates."""

    suite: str | dict[str, Any] | None = Field(
        None,
        description="An eval suite YAML file (relative to the pipeline file) or the suite inline; null: the defaults.",
    )
    name: str | None = Field(None, description="Name of the eval report artifact (default <pipeline>-eval).")


class DocsStage(_Strict):
    """The audit documents: model card, Annex IV, AB 2013, EU summary, ML-BOM, attestation."""

    intended_use: str | None = Field(
        None, description="YAML with intended_use, limitations, provider... (relative to the pipeline file)."
    )
    formats: list[Literal["md", "html", "pdf"]] = Field(
        ["md", "html"], description="Document formats (pdf needs Chromium)."
    )


class ApproveStage(_Strict):
    """A signed approval by a named person (only when this section is present)."""

    by: str = Field(..., min_length=1, description="Full name of the person approving.")
    note: str = Field(..., min_length=1, description="What was checked.")


class DeployStage(_Strict):
    """Deployment: 'serve' starts the server, asks one question through the openai client, resolves the
    answer's provenance and stops; 'record' only records a deploy run; 'none' skips the stage."""

    mode: Literal["serve", "record", "none"] = Field("serve", description="serve | record | none.")
    ask: str | None = Field(
        None,
        description="The input to send (for classification data: a text to "
        "classify, wrapped in the dataset's prompt). Default: the "
        "first test example.",
    )
    max_tokens: int = Field(16, ge=1, le=100_000, description="Answer length budget.")
    parity: bool = Field(
        True,
        description="Replay the eval set's prompts through the serving path first "
        "(`finetrace parity`) and refuse to deploy below min_serve_agreement.",
    )
    min_serve_agreement: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Share of eval answers the served "
        "answers must equal (default 1.0: token-exact on the native engine; "
        "0.95 on llamacpp and vllm).",
    )
    engine: Literal["native", "llamacpp", "vllm"] = Field(
        "native", description="The engine behind the gateway (`finetrace serve --engine`); parity runs on it too."
    )
    upstream: str | None = Field(None, description="With engine: vllm, the URL of a running vLLM to attach to.")


class PipelineConfig(_Strict):
    """One pipeline: model -> data -> train -> evaluate (gates) -> docs -> approve -> deploy."""

    name: str = Field(..., description="Pipeline name; prefixes the artifacts it records (<name>-lora...).")
    model: ModelStage = Field(..., description="The base model.")
    data: DataStage = Field(..., description="The data import.")
    train: TrainStage = Field(default_factory=TrainStage, description="The training run.")
    evaluate: EvaluateStage = Field(default_factory=EvaluateStage, description="Base vs tuned evaluation with gates.")
    docs: DocsStage | None = Field(default_factory=DocsStage, description="Audit documents (null: skip).")
    approve: ApproveStage | None = Field(None, description="Optional named approval.")
    deploy: DeployStage = Field(default_factory=DeployStage, description="Deployment.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return yamlfile.artifact_name(v)

    # set by load_pipeline: the folder that relative paths are resolved against
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    def path(self, rel: str | None) -> Path | None:
        """A path from the config, resolved against the pipeline file's folder."""
        if rel is None:
            return None
        p = Path(rel).expanduser()
        return p if p.is_absolute() else (self._base_dir / p)

    def train_doc(self) -> dict:
        """The train keys: the ``config`` file's keys, then inline keys over them (no base_model/dataset)."""
        doc: dict = {}
        if self.train.config:
            doc = yamlfile.read_config(
                self.path(self.train.config),
                "train config (train.config)",
                missing_hint="give a path relative to the pipeline file",
            )[0]
        doc.update({k: v for k, v in (self.train.model_extra or {}).items()})
        for k in ("base_model", "dataset"):
            if k in doc:
                raise ConfigError("set by the pipeline (from the model and data stages); remove it", field=f"train.{k}")
        doc.setdefault("output_name", f"{self.name}-lora")
        return doc


def validate_train(cfg: PipelineConfig, file: str | None = None, lines: dict[str, int] | None = None):
    """Check the train keys now (with placeholder model/data), so a typo fails before anything runs."""
    from ..train.config import ALIASES, TrainConfig

    doc = {**cfg.train_doc(), "base_model": "sha256:" + "0" * 64, "dataset": "placeholder"}

    def locate(key: str) -> tuple[str | None, int | None, str]:
        inline = key.split(".")[0] in (cfg.train.model_extra or {})
        if not inline and cfg.train.config:  # the key came from the train config file: name that file
            tfile = cfg.path(cfg.train.config)
            return str(tfile), yamlfile.read_config(tfile, "train config")[1].get(key), key
        return file, (lines or {}).get(f"train.{key}"), f"train.{key}"

    return yamlfile.validate_model(
        TrainConfig,
        doc,
        "train config",
        prefix="train.",
        locate=locate,
        reference="see docs/config-reference.md (train config)",
        aliases=ALIASES,
    )


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline YAML file; errors name the file, line and key."""
    p = Path(path)
    doc, lines = yamlfile.read_config(
        p, "pipeline file", missing_hint="give the path of a pipeline YAML, e.g. examples/clauses/pipeline.yaml"
    )
    cfg = parse_pipeline(doc, file=str(p), lines=lines)
    cfg._base_dir = p.resolve().parent
    validate_train(cfg, str(p), lines)
    if isinstance(cfg.evaluate.suite, dict):  # an inline suite is checked now, not after training
        from ..evaluate.suite import parse_suite

        parse_suite(cfg.evaluate.suite, str(p), lines, prefix="evaluate.suite.")
    return cfg


def parse_pipeline(doc: Any, file: str | None = None, lines: dict[str, int] | None = None) -> PipelineConfig:
    """Validate a mapping as a pipeline config (errors name the key, with file and line when known)."""
    return yamlfile.validate_model(
        PipelineConfig, doc, "pipeline", file=file, lines=lines, reference="see docs/config-reference.md (pipeline)"
    )


def check_files(cfg: PipelineConfig) -> None:
    """Read every file the pipeline names, so a missing or bad one fails before the first stage runs.

    Data files must exist; the datasheet, train config, suite and intended-use files are parsed and
    validated as their stages will. Raises ConfigError/InputError naming the key and the file.
    """
    from ..audit.facts import load_intended
    from ..data.datasheet import load_given
    from ..evaluate.suite import load_suite

    src = cfg.model.source
    if src.endswith(".gguf") or src.startswith((".", "/", "~")):
        _must_exist(cfg, src, "model.source")
    for f in cfg.data.files:
        _must_exist(cfg, f, "data.files")
    if cfg.data.test_file:
        _must_exist(cfg, cfg.data.test_file, "data.test_file")
    if cfg.data.datasheet:
        load_given(_must_exist(cfg, cfg.data.datasheet, "data.datasheet", folder=False))
    cfg.train_doc()
    if isinstance(cfg.evaluate.suite, str):
        load_suite(_must_exist(cfg, cfg.evaluate.suite, "evaluate.suite", folder=False))
    if cfg.docs is not None and cfg.docs.intended_use:
        load_intended(_must_exist(cfg, cfg.docs.intended_use, "docs.intended_use", folder=False))


def _must_exist(cfg: PipelineConfig, rel: str, key: str, folder: bool = True) -> Path:
    p = cfg.path(rel)
    if not (p.is_file() or (folder and p.is_dir())):
        raise ConfigError(
            f"no such file: {p}",
            field=key,
            hint=f"paths are relative to the pipeline file ({cfg.base_dir}); nothing has run yet",
        )
    return p
