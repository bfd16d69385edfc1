"""Helpers shared by the serve tests (a module of its own: conftest modules of sibling folders clash)."""

from __future__ import annotations

import json
import threading


def make_adapter(
    ws,
    base_art,
    tokenizer,
    base_dir,
    name: str,
    seed: int,
    tmp_path,
    dataset: str | None = None,
    metadata: dict | None = None,
    r: int = 4,
):
    """Train-like: a LoRA adapter with random non-zero B, stored and recorded by a `train` run."""
    from finetrace.models.identity import text_identity
    from finetrace.models.tiny import random_lora

    out = random_lora(
        base_dir,
        tmp_path / f"adapter-{name}-{seed}",
        seed,
        r=r,
        target_modules=("q_proj", "v_proj", "o_proj", "up_proj"),
    )
    ident = text_identity(tokenizer)
    (out / "finetrace_adapter.json").write_text(json.dumps({"base_model": base_art.digest, **ident}))
    if dataset is None:
        ds_dir = tmp_path / f"dataset-{name}-{seed}"
        ds_dir.mkdir()
        (ds_dir / "dataset.json").write_text(json.dumps({"schema": "completion", "counts": {"train": 1}}))
        (ds_dir / "datasheet.json").write_text(json.dumps({"title": f"{name} data", "license": "CC-BY-4.0"}))
        dataset = ws.ledger.add_artifact("dataset", ws.store.put_dir(ds_dir), name=f"{name}-data").digest
    meta = {"base_model": base_art.digest, "method": "lora", "r": r, **ident, **(metadata or {})}
    with ws.ledger.run(
        "train", config={"method": "lora", "r": r, "seed": seed}, inputs=[base_art.digest, dataset], seed=seed
    ) as run:
        art = run.output("adapter", ws.store.put_dir(out), name=name, metadata=meta)
    ws.checkpoint()
    return art


class hold_scheduler:
    """``with hold_scheduler(engine):`` the scheduler runs a control that waits, so nothing is admitted
    or decoded until the block ends (requests submitted meanwhile stay queued)."""

    def __init__(self, engine, timeout: float = 30):
        self.engine, self.timeout = engine, timeout
        self.started, self.release = threading.Event(), threading.Event()

    def __enter__(self):
        from concurrent.futures import Future

        def hold():
            self.started.set()
            self.release.wait(self.timeout)

        self.engine._controls.put((hold, Future()))
        assert self.started.wait(self.timeout), "the scheduler did not take the control"
        return self.release

    def __exit__(self, *exc):
        self.release.set()


def logged_events(ws, deployment: str) -> list[dict]:
    """The ``serve.request`` event payloads of one deployment, in ledger order."""
    return [e.data for e in ws.ledger.entries(type="serve.request") if e.data["deployment"] == deployment]


def validate_json(instance, schema) -> None:
    """``jsonschema.validate``, imported on first use: importing jsonschema (and the rfc3987 grammar it loads)
    takes seconds, which every test worker would pay at collection."""
    import jsonschema

    jsonschema.validate(instance, schema)
