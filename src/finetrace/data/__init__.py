"""The data stage: turn user files into immutable, documented ``dataset`` versions.

Public entry points (the CLI, train, evaluate and tests call only these):

    import_dataset(ws, files, name, ...) -> Artifact       # `finetrace data import`
    open_dataset(ws, ref) -> (folder, dataset.json, Artifact)
    read_split(ws, ref, split) -> pyarrow.Table
    iter_examples(ws, ref, split) -> Iterator[Example]    # rows rendered by schemas.to_example
    list_datasets / head / stats / datasheet / diff        # `finetrace data list|head|stats|show|diff`

File structure::

    schemas.py     layout of a dataset artifact; to_example (the data/train/evaluate contract)
    readers.py     one streaming reader per format (JSONL, JSON, CSV, TSV, Parquet, datasets folder)
    compressed.py  opening a file as its decompressed bytes (gzip/zstd by magic), corruption reported
    validate.py    column mapping, schema detection, per-row checks
    clean.py       NFC normalisation, exact keys, MinHash/LSH near-duplicates
    pii.py         PII detectors (registry), redaction
    split.py       deterministic, stratified, leak-free split assignment
    datasheet.py   given facts, measured facts, gaps; rendering
    options.py     ImportOptions: the one typed model of an import (CLI, pipeline, function)
    arrowtext.py   whole-batch text work on Arrow arrays (normalise, keys, MinHash), same results as clean.py
    batches.py     pass 1 per record batch: validate, normalise, PII, hash (in this process or a worker)
    workers.py     chunking files, worker processes that clean chunks in order
    formats.py     OpenAI fine-tuning JSONL, ShareGPT, Alpaca: detected by content, mapped onto the schemas
    chat.py        a conversation through the model's chat template; where its assistant turns are
    hub.py         --from-hub ID[@revision] (huggingface_hub, offline from the local cache)
    newtask.py     `finetrace new`: a task folder sized to the data
    erasure.py     `finetrace data forget`: erasure runs, downstream lineage, purge
    importer.py    import_dataset: the two streaming passes and the ledger records
    writer.py      pass 2: the dataset folder written (splits, dataset.json, datasheet), the transform list
    versions.py    reading recorded versions
"""

import importlib

_LAZY = {
    "import_dataset": "importer",
    "ImportOptions": "options",
    "datasheet": "versions",
    "diff": "versions",
    "head": "versions",
    "iter_examples": "versions",
    "list_datasets": "versions",
    "open_dataset": "versions",
    "read_split": "versions",
    "stats": "versions",
}


def __getattr__(name: str):  # lazy, so a worker process imports only what it runs (batches.py)
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ImportOptions",
    "datasheet",
    "diff",
    "head",
    "import_dataset",
    "iter_examples",
    "list_datasets",
    "open_dataset",
    "read_split",
    "stats",
]
