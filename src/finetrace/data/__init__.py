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
    validate.py    column mapping, schema detection, per-row checks
    clean.py       NFC normalisation, exact keys, MinHash/LSH near-duplicates
    pii.py         PII detectors (registry), redaction
    split.py       deterministic, stratified, leak-free split assignment
    datasheet.py   given facts, measured facts, gaps; rendering
    importer.py    import_dataset: the two streaming passes and the ledger records
    versions.py    reading recorded versions
"""

from .importer import import_dataset
from .versions import datasheet, diff, head, iter_examples, list_datasets, open_dataset, read_split, stats

__all__ = ["datasheet", "diff", "head", "import_dataset", "iter_examples", "list_datasets", "open_dataset",
           "read_split", "stats"]
