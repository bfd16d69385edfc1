"""Every input format and every schema imports, and the stored Parquet round-trips exactly."""

from __future__ import annotations

import csv
import gzip
import json

import pytest
import zstandard

from finetrace.data import import_dataset, iter_examples, open_dataset, read_split
from finetrace.errors import InputError

from .dataset_files import all_rows, completion_rows, write_jsonl


def _key(r):
    return json.dumps({k: r[k] for k in ("prompt", "completion")}, sort_keys=True)


def _write(fmt: str, tmp_path, rows):
    if fmt == "jsonl":
        return write_jsonl(tmp_path / "d.jsonl", rows)
    if fmt == "json":
        p = tmp_path / "d.json"
        p.write_text(json.dumps(rows, indent=2), encoding="utf-8")
        return p
    if fmt in ("csv", "tsv"):
        p = tmp_path / f"d.{fmt}"
        with open(p, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, ["prompt", "completion"], delimiter="," if fmt == "csv" else "\t")
            w.writeheader()
            w.writerows(rows)
        return p
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), p)
        return p
    if fmt == "hf_disk":
        from datasets import Dataset

        p = tmp_path / "hfdata"
        Dataset.from_list(rows).save_to_disk(str(p))
        return p
    if fmt == "jsonl.gz":
        p = tmp_path / "d.jsonl.gz"
        p.write_bytes(gzip.compress(write_jsonl(tmp_path / "x.jsonl", rows).read_bytes()))
        return p
    if fmt == "jsonl.zst":
        p = tmp_path / "d.jsonl.zst"
        p.write_bytes(zstandard.ZstdCompressor().compress(write_jsonl(tmp_path / "x.jsonl", rows).read_bytes()))
        return p
    if fmt == "csv.zst":
        plain = _write("csv", tmp_path, rows)
        p = tmp_path / "d.csv.zst"
        p.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
        return p
    if fmt == "parquet.gz":
        plain = _write("parquet", tmp_path, rows)
        p = tmp_path / "d2.parquet.gz"
        p.write_bytes(gzip.compress(plain.read_bytes()))
        return p
    raise AssertionError(fmt)


@pytest.mark.parametrize(
    "fmt", ["jsonl", "json", "csv", "tsv", "parquet", "hf_disk", "jsonl.gz", "jsonl.zst", "csv.zst", "parquet.gz"]
)
def test_each_format_imports_every_row(workspace, tmp_path, fmt):
    rows = completion_rows(25)
    rows[3]["prompt"] = 'Line one,\nline "two"\twith tab — and ünïcödé'  # quoting, newlines, tabs
    path = _write(fmt, tmp_path, rows)
    art = import_dataset(workspace, [path], "fmt")
    assert art.ref == "fmt@1" and art.kind == "dataset"
    got = all_rows(workspace, "fmt")
    assert sorted(map(_key, got)) == sorted(map(_key, rows))
    _, info, _ = open_dataset(workspace, "fmt")
    assert info["sources"][0]["format"] == ("hf_disk" if fmt == "hf_disk" else fmt.split(".")[0])
    assert info["rows_in"] == 25 and info["rows_out"] == 25


def test_utf8_bom_is_skipped(workspace, tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + write_jsonl(tmp_path / "x.jsonl", completion_rows(5)).read_bytes())
    import_dataset(workspace, [p], "bom")
    assert len(all_rows(workspace, "bom")) == 5  # the first key is 'prompt', not '\ufeffprompt'
    c = tmp_path / "bom.csv"
    c.write_bytes(b"\xef\xbb\xbfprompt,completion\nhello there,general kenobi\n")
    import_dataset(workspace, [c], "bomcsv", splits=(1, 0, 0))
    assert all_rows(workspace, "bomcsv") == [{"prompt": "hello there", "completion": "general kenobi"}]


SCHEMA_ROWS = {
    "completion": lambda i: {"prompt": f"prompt {i} about item {i * 7}", "completion": f"completion {i}"},
    "chat": lambda i: {
        "messages": ([{"role": "system", "content": "Be brief."}] if i % 2 else [])
        + [{"role": "user", "content": f"hello number {i}"}, {"role": "assistant", "content": f"reply {i * 11}"}]
    },
    "classification": lambda i: {"text": f"ticket {i} about topic {i * 13}", "label": ["billing", "tech"][i % 2]},
    "preference": lambda i: {"prompt": f"question {i}", "chosen": f"good answer {i * 3}", "rejected": f"bad {i}"},
}


@pytest.mark.parametrize("schema", list(SCHEMA_ROWS))
def test_each_schema_detected_and_rendered(workspace, tmp_path, schema):
    rows = [{**SCHEMA_ROWS[schema](i), "id": i, "group": f"g{i}"} for i in range(20)]
    art = import_dataset(workspace, [write_jsonl(tmp_path / "s.jsonl", rows)], schema)
    assert art.metadata["schema"] == schema
    _, info, _ = open_dataset(workspace, schema)
    assert info["columns"][-2:] == ["id", "group"]
    got = all_rows(workspace, schema)
    assert sorted(r["id"] for r in got) == sorted(str(i) for i in range(20))  # ids carried through as text
    examples = [ex for s in ("train", "validation", "test") for ex in iter_examples(workspace, schema, s)]
    assert len(examples) == 20 and all(ex.target and ex.messages[-1]["role"] == "user" for ex in examples)
    if schema == "classification":
        assert info["labels"] == ["billing", "tech"]
        assert info["prompt_format"] == "labels-first"  # the default, recorded with the dataset
        assert examples[0].messages[0]["content"].startswith("Answer with one of: billing, tech.\n\nticket ")
    else:
        assert "prompt_format" not in info  # only classification prompts are rendered from a format
    if schema == "preference":
        assert all(ex.rejected for ex in examples)


def test_mapping_and_explicit_schema(workspace, tmp_path):
    rows = [{"question": f"q{i} something", "answer": f"a{i}", "extra": i} for i in range(10)]
    p = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(
        InputError, match="cannot tell the schema.*--schema completion --map prompt=question --map completion=answer"
    ):
        import_dataset(workspace, [p], "m")
    art = import_dataset(workspace, [p], "m", schema="completion", mapping=["prompt=question", "completion=answer"])
    assert sorted(r["prompt"] for r in all_rows(workspace, "m")) == sorted(f"q{i} something" for i in range(10))
    _, info, _ = open_dataset(workspace, art.ref)
    assert info["dropped_columns"] == ["extra"]  # recorded, not silently lost


def test_ambiguous_columns_ask_for_schema(workspace, tmp_path):
    p = write_jsonl(tmp_path / "amb.jsonl", [{"prompt": "p", "completion": "c", "text": "t", "label": "l"}])
    with pytest.raises(InputError, match="fit several schemas.*--schema"):
        import_dataset(workspace, [p], "amb")


def test_round_trip_with_datasets_and_pandas(workspace, tmp_path):
    import pandas as pd
    from datasets import Dataset

    rows = [
        {
            "messages": [{"role": "user", "content": f"hi {i} ✓"}, {"role": "assistant", "content": f"yo {i}"}],
            "id": f"r{i}",
        }
        for i in range(12)
    ]
    import_dataset(workspace, [write_jsonl(tmp_path / "c.jsonl", rows)], "rt", splits=(1, 0, 0))
    folder, info, _ = open_dataset(workspace, "rt")
    assert {p.name for p in folder.iterdir() if not p.name.startswith(".")} == {
        "datasheet.json",
        "dataset.json",
        "train.parquet",
    }
    ours = read_split(workspace, "rt", "train").to_pylist()
    hf = Dataset.from_parquet(str(folder / "train.parquet")).to_list()
    pdf = pd.read_parquet(folder / "train.parquet")
    pd_rows = [{"messages": [dict(m) for m in r["messages"]], "id": r["id"]} for r in pdf.to_dict("records")]
    assert ours == hf == pd_rows
    assert sorted(ours, key=lambda r: r["id"]) == sorted(rows, key=lambda r: r["id"])


def test_classification_prompt_formats_and_datasets_from_before_the_key(workspace, tmp_path):
    from finetrace.data.schemas import to_example

    rows = [SCHEMA_ROWS["classification"](i) for i in range(12)]
    import_dataset(
        workspace, [write_jsonl(tmp_path / "c.jsonl", rows)], "tf", prompt_format="text-first", splits=(1, 0, 0)
    )
    _, info, _ = open_dataset(workspace, "tf")
    assert info["prompt_format"] == "text-first"
    for ex in iter_examples(workspace, "tf", "train"):
        text = ex.messages[0]["content"].split("\n\n")[0]
        assert (
            text.startswith("ticket ") and ex.messages[0]["content"] == f"{text}\n\nAnswer with one of: billing, tech."
        )
    row, labels = rows[0], ["billing", "tech"]
    # a dataset.json without the key (imported before it existed) keeps the prompts its adapters learnt
    legacy = to_example(row, "classification", labels).messages[0]["content"]
    assert legacy == f"{row['text']}\n\nAnswer with one of: billing, tech."
    first = to_example(row, "classification", labels, "labels-first").messages[0]["content"]
    assert first == f"Answer with one of: billing, tech.\n\n{row['text']}"
    with pytest.raises(ValueError, match="prompt_format"):
        to_example(row, "classification", labels, "sideways")
