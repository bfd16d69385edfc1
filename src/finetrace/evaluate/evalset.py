"""Read one split of a recorded ``dataset`` artifact as evaluation examples (``to_example``).

    load_eval_set(ws, "support@2:test")  -> EvalSet(artifact, schema, labels, split, examples)

The split may be given after the reference (``NAME@V:split``, ``sha256:...:split``) or by the suite.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..data.schemas import SCHEMAS, Example, to_example
from ..errors import InputError, NotFoundError
from ..ledger import Artifact
from ..workspace import Workspace


@dataclass
class EvalSet:
    artifact: Artifact
    schema: str
    labels: list[str] | None
    split: str
    examples: list[Example]

    @property
    def task(self) -> str:
        return "classification" if self.schema == "classification" else "generation"

    @property
    def groups(self) -> list[str | None]:
        return [e.group for e in self.examples]

    @property
    def has_groups(self) -> bool:
        return any(g is not None for g in self.groups)


def split_ref(ref: str) -> tuple[str, str | None]:
    """``("name@2", "test")`` from ``"name@2:test"``; a bare digest keeps its ``sha256:`` prefix."""
    body = ref[len("sha256:") :] if ref.startswith("sha256:") else ref
    prefix = ref[: len(ref) - len(body)]
    if ":" in body:
        name, split = body.rsplit(":", 1)
        return prefix + name, split or None
    return ref, None


def load_eval_set(ws: Workspace, ref: str, split: str | None = None, limit: int | None = None) -> EvalSet:
    """The examples of one split; the split in ``ref`` wins over ``split`` (default ``test``)."""
    import pyarrow.parquet as pq

    name, ref_split = split_ref(ref)
    art = ws.ledger.resolve(name, kind="dataset")
    split = ref_split or split or "test"
    folder = ws.store.materialize(art.digest)
    meta_path = folder / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"dataset {art.ref} has no readable dataset.json: {exc}", file="dataset.json") from exc
    schema = meta.get("schema")
    if schema not in SCHEMAS:
        raise InputError(f"dataset {art.ref}: unknown schema {schema!r}", file="dataset.json", field="schema")
    path = folder / f"{split}.parquet"
    if not path.exists():
        have = sorted(p.stem for p in folder.glob("*.parquet"))
        raise NotFoundError(
            f"dataset {art.ref} has no split {split!r}",
            hint=f"splits: {', '.join(have) or 'none'}; use {name}:{have[0] if have else 'test'}",
        )
    labels = meta.get("labels") or None
    rows = pq.read_table(path).to_pylist()
    if limit:
        rows = rows[:limit]
    examples = []
    for i, row in enumerate(rows):
        try:
            examples.append(to_example(row, schema, labels, meta.get("prompt_format")))
        except (KeyError, ValueError) as exc:
            raise InputError(f"row {i} cannot be rendered: {exc}", file=f"{split}.parquet", line=i + 1) from None
    if not examples:
        raise InputError(f"dataset {art.ref} split {split!r} is empty", file=f"{split}.parquet")
    return EvalSet(art, schema, [str(x) for x in labels] if labels else None, split, examples)
