"""Erasure (GDPR Art. 17): ``finetrace data forget DATASET@V --where EXPR | --ids FILE | --match TEXT``.

``forget`` selects rows of a dataset version, adds their near-duplicates (MinHash, the threshold the
version was imported with), and mints version N+1 of the same dataset without them, through an
``erasure`` run whose config names the selector and the requester and whose metrics hold the SHA-256
of each removed row's canonical JSON (never its text). The new version's ``dataset.json`` ends its
``transforms`` with an ``erasure`` step, so the documents of any adapter trained on it say so.
Every artifact downstream of the old version (adapters, eval reports, documents, bundles, and the
deploy and publish runs that used them) is listed from the lineage, for retraining or withdrawal.

``purge=True`` deletes from the store the objects that hold the erased rows and that the new version
does not share (the old version's Parquet files, the imported source files), and records a
``data.purged`` ledger event with their digests: the ledger keeps the digests, ``verify`` accepts
exactly those objects as absent, and anything else missing is still a finding.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..atomic import write_text
from ..canonical import canonical_json, sha256_bytes
from ..errors import InputError
from ..workspace import Workspace
from .clean import MinHasher, text_fields
from .schemas import SPLITS
from .versions import open_dataset, read_split

_WHERE = re.compile(r"^\s*(\w+)\s*(==|!=|contains)\s*(?:'([^']*)'|\"([^\"]*)\"|(\S+))\s*$")


def _selector(
    rows: list[dict], schema: str, where: str | None, ids: set[str] | None, match: str | None, columns: list[str]
) -> np.ndarray:
    if sum(x is not None for x in (where, ids, match)) != 1:
        raise InputError("give exactly one of --where, --ids, --match", hint="e.g. --match 'jane@example.com'")
    if ids is not None:
        if "id" not in columns:
            raise InputError(
                "the dataset has no id column, so --ids cannot name rows",
                field="--ids",
                hint="use --match TEXT or --where FIELD == VALUE",
            )
        return np.fromiter((r.get("id") in ids for r in rows), bool, len(rows))
    if match is not None:
        needle = match.casefold()
        return np.fromiter(
            (any(needle in t.casefold() for _, t in text_fields(r, schema)) for r in rows), bool, len(rows)
        )
    m = _WHERE.match(where)
    if not m:
        raise InputError(
            f"bad --where {where!r}",
            field="--where",
            hint="FIELD == VALUE, FIELD != VALUE or FIELD contains TEXT, e.g. --where \"group == 'eu'\"",
        )
    field, op = m.group(1), m.group(2)
    value = next(v for v in m.groups()[2:] if v is not None)
    if field not in columns:
        raise InputError(
            f"--where names the field {field!r}, which the dataset does not have",
            field="--where",
            hint=f"fields: {', '.join(columns)}",
        )
    vals = [None if r.get(field) is None else str(r.get(field)) for r in rows]
    if op == "==":
        return np.array([v == value for v in vals], bool)
    if op == "!=":
        return np.array([v != value for v in vals], bool)
    return np.array([v is not None and value.casefold() in v.casefold() for v in vals], bool)


def _threshold(info: dict) -> float:
    return next((t["threshold"] for t in info.get("transforms", []) if t.get("op") == "near_duplicates"), 0.8)


def forget(
    ws: Workspace,
    ref: str,
    *,
    where: str | None = None,
    ids: set[str] | None = None,
    match: str | None = None,
    by: str,
    purge: bool = False,
) -> dict:
    """Erase rows from dataset ``ref``; return {"dataset", "removed", "near_duplicates", "downstream", "purged"}."""
    if not by or not by.strip():
        raise InputError("an erasure names who asked for it", field="--by", hint="--by 'Data Protection Officer'")
    folder, info, art = open_dataset(ws, ref)
    schema = info["schema"]
    tables = {s: read_split(ws, art.digest, s) for s in SPLITS if (info.get("counts") or {}).get(s)}
    rows, where_from = [], []
    for s, t in tables.items():
        for i, r in enumerate(t.to_pylist()):
            rows.append(r)
            where_from.append((s, i))
    chosen = _selector(rows, schema, where, ids, match, info["columns"])
    if not chosen.any():
        raise InputError(f"no row of {art.ref} matches", hint="nothing was changed; check the selector")
    downstream = _downstream(ws, art.digest)  # before the erasure adds its own output
    threshold = _threshold(info)
    mh = MinHasher(threshold, None)
    sketch, _ = mh.sketch_and_bands(["\n".join(t for _, t in text_fields(r, schema)) for r in rows])
    near = np.zeros(len(rows), bool)
    for i in np.flatnonzero(chosen):  # estimated Jaccard = fraction of equal sketch slots
        near |= (sketch == sketch[i]).mean(axis=1) >= threshold
    near &= ~chosen
    gone = chosen | near
    digests = sorted(sha256_bytes(canonical_json(rows[i])) for i in np.flatnonzero(gone))
    selector = (
        {"where": where}
        if where is not None
        else {"ids": sorted(ids)}
        if ids is not None
        else {"match_sha256": sha256_bytes(match.encode("utf-8"))}
    )
    out = Path(tempfile.mkdtemp(prefix="erasure-", dir=ws.cache if ws.cache.exists() else None))
    try:
        new_info = _write_version(folder, info, tables, where_from, gone, out, int(chosen.sum()), int(near.sum()), art)
        config = {
            "dataset": art.digest,
            "ref": art.ref,
            "selector": selector,
            "requester": by,
            "near_dup_threshold": threshold,
        }
        with ws.ledger.run("erasure", config=config, inputs=[art.digest]) as run:
            run.metrics.update(
                {
                    "removed": int(chosen.sum()),
                    "near_duplicates": int(near.sum()),
                    "row_sha256": digests,
                    "rows_out": new_info["rows_out"],
                }
            )
            digest = ws.store.put_dir(out / "dataset")
            new = run.output(
                "dataset",
                digest,
                name=art.ref.split("@")[0],
                metadata={
                    **{k: v for k, v in (art.metadata or {}).items()},
                    "counts": new_info["counts"],
                    "rows_out": new_info["rows_out"],
                    "erased_from": art.digest,
                },
            )
        purged = _purge(ws, art, digest, run.id) if purge else []
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {
        "dataset": new.ref,
        "digest": new.digest,
        "from": art.ref,
        "removed": int(chosen.sum()),
        "near_duplicates": int(near.sum()),
        "row_sha256": digests,
        "downstream": downstream,
        "purged": purged,
    }


def _write_version(
    folder: Path,
    info: dict,
    tables: dict,
    where_from: list,
    gone: np.ndarray,
    out: Path,
    n_chosen: int,
    n_near: int,
    art,
) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dest = out / "dataset"
    dest.mkdir(parents=True)
    keep = {s: np.ones(t.num_rows, bool) for s, t in tables.items()}
    for (s, i), g in zip(where_from, gone):
        if g:
            keep[s][i] = False
    counts = {}
    for s, t in tables.items():
        kept = t.filter(pa.array(keep[s]))
        counts[s] = kept.num_rows
        if keep[s].all():  # unchanged split: the very same file (and object)
            shutil.copyfile(folder / f"{s}.parquet", dest / f"{s}.parquet")
        elif kept.num_rows:
            pq.write_table(kept, dest / f"{s}.parquet", compression="zstd")
    new = dict(info)
    new["counts"] = {s: counts.get(s, 0) for s in info["counts"]}
    new["rows_out"] = sum(counts.values())
    if info.get("label_counts"):
        new["label_counts"] = {s: _label_counts(tables[s].filter(pa.array(keep[s]))) for s in tables}
    step = {"op": "erasure", "from": art.digest, "removed": n_chosen, "near_duplicates": n_near}
    new["transforms"] = list(info.get("transforms", [])) + [step]
    write_text(dest / "dataset.json", json.dumps(new, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    sheet = json.loads((folder / "datasheet.json").read_text(encoding="utf-8"))
    measured = dict(sheet.get("measured") or {})
    measured.update(
        {
            "rows_out": new["rows_out"],
            "splits": new["counts"],
            "erasure": f"{n_chosen} rows erased on request and {n_near} near-duplicates of them, "
            f"from {art.ref} ({art.digest})",
        }
    )
    sheet["measured"] = measured
    write_text(
        dest / "datasheet.json", json.dumps(sheet, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"
    )
    return new


def _label_counts(table) -> dict:
    out: dict = {}
    for v in table.column("label").to_pylist():
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def _downstream(ws: Workspace, digest: str) -> list[dict]:
    from ..ledger.lineage import lineage

    g = lineage(ws.ledger, digest, direction="down")
    arts = [{"kind": a["kind"], "ref": a["ref"], "digest": d} for d, a in g["artifacts"].items() if d != digest]
    runs = [{"kind": r["kind"], "run": rid} for rid, r in g["runs"].items() if r["kind"] in ("deploy", "publish")]
    return sorted(arts, key=lambda a: (a["kind"], a["ref"])) + runs


def _purge(ws: Workspace, art, new_digest: str, run_id: str | None) -> list[str]:
    """Delete the old version's row-holding files and its import's sources that the new version does not use."""
    keep = {e.digest for e in ws.store.tree(new_digest)} | {new_digest}
    doomed = [e.digest for e in ws.store.tree(art.digest) if e.path.endswith(".parquet")]
    if art.run_id:
        doomed += list(ws.ledger.get_run(art.run_id).inputs)
    doomed = sorted({d for d in doomed if d not in keep and ws.store.has(d)})
    ws.ledger.append(
        "data.purged", {"digests": doomed, "reason": "erasure", "dataset": art.digest, "run_id": run_id}, seal=True
    )
    for d in doomed:  # the object, and any materialised copy of the old version (hard links to it)
        ws.store.path(d).unlink(missing_ok=True)
    shutil.rmtree(ws.store.cache / art.digest.split(":", 1)[1], ignore_errors=True)
    return doomed
