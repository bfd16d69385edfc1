"""``ImportOptions``: the one typed model of how files become a dataset version.

The CLI (``finetrace data import`` flags), the pipeline (its ``data:`` section subclasses this model)
and the function (``import_dataset(ws, files, name, options)``) all fill the same model, so each
default lives here once and an error names the key the user typed::

    >>> opts = ImportOptions(on_error="skip", splits=(0.9, 0.1, 0))
    >>> import_dataset(ws, ["rows.jsonl"], "tickets", opts)
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigError
from .readers import MAX_ROW_BYTES

SCHEMA_NAMES = ("classification", "completion", "chat", "preference")
FORMAT_NAMES = ("auto", "openai", "sharegpt", "alpaca", "native")


# duplicates: alike train/config.py:TrainConfig on purpose (pydantic field declarations).
class ImportOptions(BaseModel):
    """How files are read, checked, cleaned and split (every key of ``data:`` but ``name``/``files``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    test_file: str | None = Field(
        None,
        description="A held-out file used as the test split (then "
        "'splits' divides the other files into train/validation).",
    )
    schema_: Literal["classification", "completion", "chat", "preference"] | None = Field(
        None, alias="schema", description="Row schema; null detects it from the columns."
    )
    input_format: Literal["auto", "openai", "sharegpt", "alpaca", "native"] = Field(
        "auto",
        description="Row layout: auto detects OpenAI chat fine-tuning, ShareGPT and Alpaca rows by "
        "their content; native means finetrace's own columns (see docs/data.md).",
    )
    mapping: dict[str, str] | None = Field(
        None, description="{field: column} renaming input columns to schema fields, e.g. {text: body, label: queue}."
    )
    datasheet: str | None = Field(
        None,
        description="YAML with the facts a person must supply (source, "
        "licence, collection...); missing ones become gaps.",
    )
    splits: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/validation/test fractions (with test_file, test should be 0)."
    )
    seed: int = Field(0, ge=0, lt=2**63, description="Seed of the split assignment.")
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="'fail' refuses the import on any invalid row; 'skip' drops and counts invalid rows."
    )
    pii: Literal["redact", "flag", "fail"] = Field("redact", description="What to do with personal data found in rows.")
    split_unit: Literal["row", "group"] = Field(
        "row",
        description="row: `group` only labels rows for "
        "per-group metrics; group: rows sharing a group share a split "
        "(a customer, a patient) and test groups leave training",
    )
    near_dup: Literal["group", "drop"] = Field(
        "group", description="Near-duplicates share a split (group) or only the first is kept (drop)."
    )
    near_dup_threshold: float = Field(
        0.8,
        gt=0,
        le=1,
        description="MinHash Jaccard similarity above which two rows are near-duplicates (1.0: exact duplicates only).",
    )
    prompt_format: Literal["labels-first", "text-first"] = Field(
        "labels-first",
        description="classification: how a row becomes a prompt. labels-first: 'Answer with one of: ...', a "
        "blank line, the text (every prompt starts alike, so the decoder reads that beginning once); "
        "text-first: the text, then the instruction (the format of datasets imported before this key).",
    )
    tokenizer: str | None = Field(
        None, description="A base model ref or tokenizer folder: the datasheet then holds a token-length histogram."
    )
    max_row_bytes: int = Field(
        MAX_ROW_BYTES,
        ge=1024,
        le=1 << 30,
        description="A row (line) longer than this many bytes is refused without being loaded.",
    )
    from_hub: dict | None = Field(
        None,
        description="Set by --from-hub: the Hub dataset id, the revision "
        "asked for and the commit it resolved to (recorded with the import).",
    )
    workers: int = Field(
        0,
        ge=0,
        le=64,
        description="Worker processes for the per-row checks (0: one per "
        "CPU up to 4 for inputs over 64 MiB, else none).",
    )

    @field_validator("test_file", "datasheet", "tokenizer", mode="before")
    @classmethod
    def _path(cls, v: Any):
        return str(v) if isinstance(v, PurePath) else v

    @field_validator("mapping", mode="before")
    @classmethod
    def _mapping(cls, v: Any):
        if isinstance(v, (list, tuple)):  # CLI items "field=column"
            from .validate import parse_mapping

            return parse_mapping(list(v)) or None
        return v or None

    @property
    def schema(self) -> str | None:  # the field is schema_ (BaseModel.schema is pydantic's)
        return self.schema_


FLAGS = {"schema_": "--schema", "schema": "--schema", "mapping": "--map", "input_format": "--format"}


def build_options(options: ImportOptions | dict | None = None, **overrides) -> ImportOptions:
    """``options`` with ``overrides`` applied (keyword arguments of ``import_dataset``), validated.

    Raises ConfigError naming the key (as a CLI flag) and what is allowed.
    """
    base = options.model_dump(by_alias=True) if isinstance(options, ImportOptions) else dict(options or {})
    if "schema_" in overrides:
        overrides["schema"] = overrides.pop("schema_")
    base.update({k: v for k, v in overrides.items()})
    try:
        return ImportOptions.model_validate(base)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "options"
        top = str(err["loc"][0]) if err["loc"] else key
        flag = FLAGS.get(top, "--" + top.replace("_", "-"))
        if err["type"] == "extra_forbidden":
            import difflib

            close = difflib.get_close_matches(top, list(ImportOptions.model_fields), 1, 0.6)
            raise ConfigError(
                f"unknown import option {top!r}",
                hint=f"did you mean {close[0]!r}?" if close else f"known: {', '.join(ImportOptions.model_fields)}",
            ) from None
        where = f" ({key})" if key != top else ""
        raise ConfigError(
            f"bad {flag} {err.get('input')!r}{where}: {err['msg']}",
            hint=f"see `finetrace data import --help` for {flag} (pipeline key data.{top})",
        ) from None
