"""A corpus of broken inputs for every reader (JSONL, JSON array, CSV, Parquet, gzip/zstd): encodings,
control characters, truncated or corrupt compression, wrong types at every level, huge values,
duplicate keys, binary files. Each is refused naming the file and the line or field, with a fix, and
the workspace is left exactly as it was (no ledger entry, object, artifact or scratch folder)."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from finetrace.data import import_dataset
from finetrace.errors import InputError
from finetrace.ledger import verify_workspace

from .dataset_files import completion_rows, snapshot

GOOD = [json.dumps(r) for r in completion_rows(6)]
GOOD_BYTES = ("\n".join(GOOD) + "\n").encode()


def _put(tmp_path, name, data: bytes | str):
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return p


def _jsonl(tmp_path, name, bad_line: str, at: int = 3):
    return _put(tmp_path, name, "\n".join(GOOD[: at - 1] + [bad_line] + GOOD[at - 1 :]) + "\n")


def _parquet(tmp_path, name, rows, schema=None):
    p = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), p)
    return p


CASES = {
    # name: (builder, "file[:line]" expected in the message, field or None, regex of the message)
    "jsonl duplicate key": (
        lambda t: _jsonl(t, "dup.jsonl", '{"prompt": "a", "prompt": "b", "completion": "c"}'),
        "dup.jsonl:3",
        "prompt",
        r"the key 'prompt' appears twice in one object",
    ),
    "jsonl nested duplicate key": (
        lambda t: _jsonl(t, "dup2.jsonl", '{"messages": [{"role": "user", "role": "assistant", "content": "x"}]}'),
        "dup2.jsonl:3",
        "role",
        r"appears twice",
    ),
    "jsonl raw control character": (
        lambda t: _jsonl(t, "ctl.jsonl", '{"prompt": "a\x01b", "completion": "c"}'),
        "ctl.jsonl:3",
        None,
        r"invalid JSON: Invalid control character",
    ),
    "jsonl NUL byte": (
        lambda t: _jsonl(t, "nul.jsonl", '{"prompt": "a", "completion": "c"}\x00'),
        "nul.jsonl:3",
        None,
        r"invalid JSON",
    ),
    "jsonl escaped NUL": (
        lambda t: _jsonl(t, "enul.jsonl", '{"prompt": "a\\u0000b", "completion": "c"}'),
        "enul.jsonl:3",
        "prompt",
        r"holds a NUL character",
    ),
    "jsonl lone surrogate": (
        lambda t: _jsonl(t, "sur.jsonl", '{"prompt": "bad \\ud800 text", "completion": "c"}'),
        "sur.jsonl:3",
        "prompt",
        r"lone UTF-16 surrogate",
    ),
    "jsonl number too large": (
        lambda t: _jsonl(t, "big.jsonl", '{"prompt": 1e400, "completion": "c"}'),
        "big.jsonl:3",
        "prompt",
        r"'prompt' must be a string, got float Infinity",
    ),
    "jsonl nested too deeply": (
        lambda t: _jsonl(t, "deep.jsonl", "[" * 100000 + "]" * 100000),
        "deep.jsonl:3",
        None,
        r"nested too deeply",
    ),
    "jsonl object where text belongs": (
        lambda t: _jsonl(t, "obj.jsonl", '{"prompt": {"text": "a"}, "completion": "c"}'),
        "obj.jsonl:3",
        "prompt",
        r"'prompt' must be a string, got dict",
    ),
    "jsonl two objects on a line": (
        lambda t: _jsonl(t, "two.jsonl", GOOD[0] + " " + GOOD[1]),
        "two.jsonl:3",
        None,
        r"invalid JSON: Extra data",
    ),
    "jsonl chat content not text": (
        lambda t: _jsonl(t, "chat.jsonl", '{"messages": [{"role": "user", "content": 5}]}', at=1),
        "chat.jsonl:1",
        "messages",
        r"messages\[0\] must be an object with string 'role' and 'content'",
    ),
    "binary file named .jsonl": (
        lambda t: _put(t, "bin.jsonl", bytes(range(256)) * 4),
        "bin.jsonl:1",
        None,
        r"not valid UTF-8|invalid JSON",
    ),
    "json array of numbers": (
        lambda t: _put(t, "nums.json", "[1, 2, 3]"),
        "nums.json:1",
        None,
        r"expected a JSON object, got a number",
    ),
    "json array duplicate key": (
        lambda t: _put(
            t,
            "adup.json",
            '[{"prompt": "a", "completion": "b"},\n {"prompt": "a", "completion": "b", "completion": "c"}]',
        ),
        "adup.json:2",
        "completion",
        r"appears twice",
    ),
    "csv NUL byte": (
        lambda t: _put(t, "nul.csv", "prompt,completion\nhello,world\nbad\x00,row\n"),
        "nul.csv:3",
        "prompt",
        r"holds a NUL character",
    ),
    "csv duplicate header": (
        lambda t: _put(t, "hdr.csv", "prompt,prompt\nhello,world\n"),
        "hdr.csv:1",
        None,
        r"duplicate column names \(prompt\)",
    ),
    "csv UTF-16": (
        lambda t: _put(t, "u16.csv", "prompt,completion\nhello,world\n".encode("utf-16")),
        "u16.csv:1",
        None,
        r"UTF-16 encoded",
    ),
    "parquet truncated": (
        lambda t: _put(t, "cut.parquet", _parquet(t, "whole.parquet", completion_rows(20)).read_bytes()[:-40]),
        "cut.parquet",
        None,
        r"not a readable Parquet file",
    ),
    "parquet wrong type": (
        lambda t: _parquet(t, "types.parquet", [{"text": f"t{i}", "label": i} for i in range(5)]),
        "types.parquet:1",
        "label",
        r"'label' must be a string, got int 0",
    ),
    "parquet nested value": (
        lambda t: _parquet(t, "nest.parquet", [{"prompt": {"a": "x"}, "completion": "y"}] * 3),
        "nest.parquet:1",
        "prompt",
        r"'prompt' must be a string, got dict",
    ),
    "gzip truncated": (
        lambda t: _put(t, "cut.jsonl.gz", gzip.compress(GOOD_BYTES * 50)[:-200]),
        "cut.jsonl.gz",
        None,
        r"the gzip data is truncated or corrupt",
    ),
    "gzip corrupt CRC": (
        lambda t: _put(t, "crc.jsonl.gz", (lambda b: b[:-8] + bytes(8))(gzip.compress(GOOD_BYTES))),
        "crc.jsonl.gz",
        None,
        r"the gzip data is truncated or corrupt",
    ),
    "zstd corrupt": (
        lambda t: _put(
            t,
            "bad.jsonl.zst",
            (lambda b: b[:20] + b"\xff" * 16 + b[36:])(zstandard.ZstdCompressor().compress(GOOD_BYTES * 50)),
        ),
        "bad.jsonl.zst",
        None,
        r"the zstd data is truncated or corrupt",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_input_is_refused_with_place_and_fix(workspace, tmp_path, case):
    build, where, field, pattern = CASES[case]
    path = build(tmp_path)
    before = snapshot(workspace)
    with pytest.raises(InputError, match=pattern) as info:
        import_dataset(workspace, [path], "broken")
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path}/{where}"), msg
    if field:
        assert f"field '{field}'" in msg, msg
    assert info.value.hint, "every refusal says what to do next"
    assert snapshot(workspace) == before
    assert list(workspace.cache.glob("import-*")) == []
    assert verify_workspace(workspace).ok


def test_broken_rows_are_skipped_and_counted_by_reason(workspace, tmp_path):
    lines = (
        GOOD[:3]
        + [
            '{"prompt": "a", "prompt": "b", "completion": "c"}',
            '{"prompt": "x \\udc00", "completion": "c"}',
            '{"prompt": 1e400, "completion": "c"}',
        ]
        + GOOD[3:]
    )
    p = _put(tmp_path, "mixed.jsonl", "\n".join(lines) + "\n")
    art = import_dataset(workspace, [p], "mixed", on_error="skip", splits=(1, 0, 0))
    assert art.metadata["rows_out"] == 6 and art.metadata["rows_in"] == 9
    from finetrace.data import open_dataset

    _, info, _ = open_dataset(workspace, art.ref)
    assert info["skipped"] == {"duplicate_key": 1, "encoding": 1, "wrong_type": 1}
