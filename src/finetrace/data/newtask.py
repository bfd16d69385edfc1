"""``finetrace new TASK --data FILE [--test FILE]``: a task folder whose pipeline runs unedited.

``new_task`` reads the data once (streaming): it detects the file format and row layout (OpenAI,
ShareGPT, Alpaca or native) and the schema, counts rows, estimates tokens per row, and writes::

    TASK/pipeline.yaml       model -> data -> train -> evaluate -> docs -> deploy (record)
    TASK/train.yaml          steps sized to ~1.5 epochs of the training split (rows after the import's
                             cleaning, de-duplication and split), with the expected time
    TASK/suite.yaml          metrics and gates that fit the schema (a group gap only with a group column)
    TASK/datasheet.yaml      every datasheet fact, commented out until a person fills it (gaps until then)
    TASK/intended_use.yaml   the same for the documents' intended use
    TASK/<data files>        copies of the data (the pipeline names them relative to itself)

The time estimate uses the throughput measured for SmolLM2-135M with LoRA on 2 CPU cores
(``bench/train_throughput.py``); it is a plan, and the training run records the real figure.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from ..errors import ConfigError, InputError
from ..ledger.log import check_name
from . import formats
from .datasheet import OPTIONAL, REQUIRED
from .readers import ReadOptions, detect_format, read_rows
from .validate import detect_schema

CPU_TOKENS_PER_S = 220.0  # SmolLM2-135M LoRA r=8..16, 2 CPU cores (docs/train.md, bench/train_throughput.py)
CPU_PEAK_GB = 2.8
BATCH = 8
EPOCHS = 1.5
TEMPLATE_TOKENS = 24  # chat-template tokens around each example
SPLITS = (0.8, 0.1, 0.1)  # the pipeline's data.splits without, and with, a test file
SPLITS_WITH_TEST = (0.9, 0.1, 0.0)
MIN_PER_GROUP = 20  # evaluated examples the smallest group needs before a group-gap gate means anything
INTENDED_USE_KEYS = (
    "intended_use",
    "intended_users",
    "out_of_scope_use",
    "limitations",
    "provider",
    "license",
    "human_oversight",
)


def _survey(path: Path) -> dict:
    """Format, layout, schema, row count, mean characters per row and columns of one file."""
    fmt = detect_format(path, str(path))
    first, n, chars, cols, groups = [], 0, 0, set(), {}
    for _line, rec, err in read_rows(path, fmt, ReadOptions(display=str(path))):
        if err is not None:
            continue
        n += 1
        chars += sum(len(str(v)) for v in rec.values())
        cols |= set(map(str, rec))
        if rec.get("group") not in (None, ""):
            groups[str(rec["group"])] = groups.get(str(rec["group"]), 0) + 1
        if len(first) < formats.DETECT_ROWS:
            first.append(rec)
    if not n:
        raise InputError(
            "no row of the file could be read",
            file=str(path),
            hint="`finetrace data import` names the problem of each row",
        )
    layout = formats.detect(first)
    schema = formats.MAPPINGS[layout]["schema"] if layout != "native" else None
    if schema is None:
        try:
            schema = detect_schema(sorted(first[0]))
        except InputError as exc:
            raise InputError(exc.message, file=str(path), line=1, hint=exc.hint) from None
    labels = (
        sorted({str(r.get("label")) for r in first if r.get("label") is not None}) if schema == "classification" else []
    )
    return {
        "format": fmt,
        "layout": layout,
        "schema": schema,
        "rows": n,
        "chars": chars / n,
        "columns": sorted(cols),
        "groups": groups,
        "labels": labels,
        "first": first[0],
    }


def new_task(
    folder: str | Path,
    data: str | Path,
    test: str | Path | None = None,
    model: str = "smollm2-135m-instruct",
    name: str | None = None,
    max_steps: int | None = None,
    eval_limit: int | None = None,
) -> dict:
    """Write the task folder (refusing to overwrite one that exists); return what was detected and planned.

    ``max_steps`` caps the planned steps and ``eval_limit`` the evaluated test examples (a quick trial
    run); the plan says so."""
    folder = Path(folder)
    name = name or folder.name
    check_name(name)
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"{folder} exists and is not empty", hint="choose a new folder name")
    survey = _survey(Path(data))
    tsurvey = _survey(Path(test)) if test else None
    n_train = _train_rows(Path(data), Path(test) if test else None, survey)
    tokens = survey["chars"] / 4 + TEMPLATE_TOKENS
    steps = max(10, min(2000, math.ceil(EPOCHS * n_train / BATCH)))
    if max_steps is not None:
        if max_steps < 1:
            raise ConfigError(f"bad --max-steps {max_steps}", hint="a positive number of optimiser steps")
        steps = min(steps, max_steps)
    seconds = steps * BATCH * tokens / CPU_TOKENS_PER_S
    max_length = int(min(2048, max(128, 2 ** math.ceil(math.log2(tokens * 2)))))
    # a group-gap gate only where there are groups, each with enough evaluated examples to mean something
    groups = (tsurvey or survey)["groups"]
    evaluated = min((tsurvey or survey)["rows"] if tsurvey else survey["rows"] // 10, eval_limit or 10**12)
    per_group = evaluated * min(groups.values()) / max(sum(groups.values()), 1) if groups else 0
    has_group = len(groups) >= 2 and per_group >= MIN_PER_GROUP
    folder.mkdir(parents=True, exist_ok=True)
    files = {"data": _copy(Path(data), folder)}
    if test:
        files["test"] = _copy(Path(test), folder, avoid=files["data"])
    plan = {
        "task": name,
        "folder": str(folder),
        **{k: survey[k] for k in ("format", "layout", "schema", "rows")},
        "test_rows": tsurvey["rows"] if tsurvey else None,
        "train_rows": n_train,
        "steps": steps,
        "batch_size": BATCH,
        "epochs": round(steps * BATCH / max(n_train, 1), 2),
        "tokens_per_example": round(tokens),
        "expected_train_minutes_cpu": round(seconds / 60, 1),
        "peak_memory_gb_cpu": CPU_PEAK_GB,
        "max_length": max_length,
        "group_gap_gate": has_group,
        "files": files,
        "eval_limit": eval_limit,
    }
    _write(folder, name, model, plan, survey, test is not None)
    return plan


def _train_rows(data: Path, test: Path | None, survey: dict) -> int:
    """Rows the training split will hold: the import's own validation, PII, duplicate and near-duplicate
    decisions and split, run without a workspace (so steps fit the data that is trained on)."""
    from .importer import planned_counts

    opts = {
        "splits": SPLITS_WITH_TEST if test else SPLITS,
        "test_file": str(test) if test else None,
        "on_error": "skip",
        **({"schema": survey["schema"]} if survey["layout"] == "native" else {}),
    }
    return planned_counts([data], opts)["counts"]["train"]


def _copy(src: Path, folder: Path, avoid: str | None = None) -> str:
    dest = src.name if src.name != avoid else f"test-{src.name}"
    if src.is_dir():
        shutil.copytree(src, folder / dest)
    else:
        shutil.copyfile(src, folder / dest)
    return dest


def _write(folder: Path, name: str, model: str, plan: dict, survey: dict, has_test: bool) -> None:
    import yaml

    schema = plan["schema"]
    data = {"name": name, "files": [plan["files"]["data"]], "datasheet": "datasheet.yaml"}
    if has_test:
        data["test_file"] = plan["files"]["test"]
        data["splits"] = list(SPLITS_WITH_TEST)
    else:
        data["splits"] = list(SPLITS)
    if survey["layout"] == "native":
        data["schema"] = schema
    pipeline = {
        "name": name,
        "model": {"source": model},
        "data": data,
        "train": {"config": "train.yaml"},
        "evaluate": {"suite": "suite.yaml"},
        "docs": {"intended_use": "intended_use.yaml"},
        "deploy": {"mode": "record"},
    }
    head = (
        f"# finetrace run {folder.name}/pipeline.yaml   (written by `finetrace new`)\n"
        f"# data: {plan['files']['data']}: {survey['format']} file, {survey['layout']} layout, {schema} schema, "
        f"{plan['rows']} rows\n# approve: add `approve: {{by: YOUR NAME, note: WHAT YOU CHECKED}}` to sign it;\n"
        "# deploy: `mode: serve` starts the server and asks the first test example.\n"
    )
    (folder / "pipeline.yaml").write_text(head + yaml.safe_dump(pipeline, sort_keys=False), encoding="utf-8")
    train = {
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "lr": 1.0e-3,
        "schedule": "cosine",
        "warmup_steps": max(1, plan["steps"] // 20),
        "max_steps": plan["steps"],
        "batch_size": BATCH,
        "max_length": plan["max_length"],
        "checkpoint_every": max(10, plan["steps"] // 5),
        "seed": 0,
    }
    (folder / "train.yaml").write_text(
        f"# {plan['steps']} steps of {BATCH} = ~{plan['epochs']} epochs of the training split "
        f"(~{plan['tokens_per_example']} tokens per example).\n# Expected on 2 CPU cores with SmolLM2-135M: "
        f"~{plan['expected_train_minutes_cpu']} min at ~{CPU_TOKENS_PER_S:.0f} tokens/s, peak memory "
        f"~{CPU_PEAK_GB} GB (a GPU is far faster).\n" + yaml.safe_dump(train, sort_keys=False),
        encoding="utf-8",
    )
    suite = _suite(name, schema, plan["group_gap_gate"])
    if plan["eval_limit"]:
        suite["limit"] = plan["eval_limit"]
    (folder / "suite.yaml").write_text(
        "# Base vs tuned on the test split, with gates (edit the thresholds to your "
        "needs).\n" + yaml.safe_dump(suite, sort_keys=False),
        encoding="utf-8",
    )
    sheet = [
        f"# Facts a person must supply about {plan['files']['data']}; each line left commented out is "
        "reported as a gap in the datasheet and documents.",
        f"title: {name}",
    ]
    sheet += [f"# {k}: FILL IN ({v})" for k, v in REQUIRED.items()]
    sheet += [f"# {k}: ({v})" for k, v in OPTIONAL.items() if k != "title"]
    (folder / "datasheet.yaml").write_text("\n".join(sheet) + "\n", encoding="utf-8")
    use = ["# What the tuned model is for (model card, Annex IV); commented-out lines are gaps."]
    use += [f"# {k}: FILL IN" for k in INTENDED_USE_KEYS]
    (folder / "intended_use.yaml").write_text("\n".join(use) + "\n", encoding="utf-8")


def _suite(name: str, schema: str, group_gap: bool) -> dict:
    if schema == "classification":
        gates = {"min_gain": {"accuracy": 0.0}, "max_flip_rate": 0.10}
        if group_gap:
            gates["max_group_gap"] = 0.20
        return {
            "name": name,
            "split": "test",
            "metrics": ["accuracy", "macro_f1"],
            "scoring": "constrained",
            "batch_size": 16,
            "bootstrap": {"samples": 500, "seed": 0, "confidence": 0.95},
            "bias": {"enabled": True, "categories": ["gender_names"], "max_examples": 24},
            "forgetting": {"enabled": False},
            "gates": gates,
        }
    return {
        "name": name,
        "split": "test",
        "metrics": ["exact_match"],
        "batch_size": 8,
        "limit": 100,
        "bootstrap": {"samples": 500, "seed": 0, "confidence": 0.95},
        "bias": {"enabled": False},
        "forgetting": {"enabled": False},
        "gates": {"min_gain": {"exact_match": 0.0}},
    }
