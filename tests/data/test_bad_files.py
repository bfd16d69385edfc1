"""The bad-file corpus: each file gets its precise error, and a refused import changes nothing."""

from __future__ import annotations

import json

import pytest

from finetrace.data import import_dataset, open_dataset
from finetrace.errors import InputError
from finetrace.ledger import verify_workspace

from .dataset_files import all_rows, completion_rows, snapshot, write_jsonl

GOOD = [json.dumps(r) for r in completion_rows(6)]


def _lines(tmp_path, name, lines: list[str]):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def _truncated(tmp_path):
    return _lines(tmp_path, "trunc.jsonl", GOOD[:3] + ['{"prompt": "cut here", "completion": "no end'] + GOOD[3:])


def _wrong_column(tmp_path):
    return _lines(tmp_path, "wrongcol.jsonl", GOOD[:2] + ['{"prompt": "a prompt", "completon": "typo"}'] + GOOD[2:])


def _utf16_bom(tmp_path):
    p = tmp_path / "utf16.jsonl"
    p.write_bytes("\n".join(GOOD).encode("utf-16"))  # starts with the FF FE byte order mark
    return p


def _latin1(tmp_path):
    p = tmp_path / "latin1.jsonl"
    lines = GOOD[:4] + [json.dumps({"prompt": "Café crème", "completion": "oui"}, ensure_ascii=False)]
    p.write_bytes("\n".join(lines).encode("latin-1"))
    return p


def _latin1_csv(tmp_path):
    p = tmp_path / "latin1.csv"
    p.write_bytes("prompt,completion\nhello,world\ngar\u00e7on,waiter\n".encode("latin-1"))
    return p


def _empty(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_bytes(b"")
    return p


def _ragged(tmp_path):
    p = tmp_path / "ragged.csv"
    p.write_text("prompt,completion\nhello,world\nthis row,has,three fields\nfine,too\n", encoding="utf-8")
    return p


def _label_not_string(tmp_path):
    rows = [{"text": f"ticket {i}", "label": "billing"} for i in range(4)] + [{"text": "ticket x", "label": 3}]
    return write_jsonl(tmp_path / "label.jsonl", rows)


def _long_line(tmp_path):
    p = tmp_path / "long.jsonl"
    with open(p, "w", encoding="utf-8") as fh:
        fh.write(GOOD[0] + "\n")
        fh.write('{"prompt": "' + "x" * (50 << 20) + '", "completion": "y"}\n')
        fh.write(GOOD[1] + "\n")
    return p


CORPUS = {
    # name: (builder, file:line in the message, field, regex for the rest)
    "truncated JSON line": (_truncated, "trunc.jsonl:4", None, r"truncated JSON: Unterminated string"),
    "wrong column": (
        _wrong_column,
        "wrongcol.jsonl:3",
        "completion",
        r"required field 'completion' is missing \(the row has completon, prompt\); "
        r"map it with --map completion=completon",
    ),
    "UTF-16 BOM": (_utf16_bom, "utf16.jsonl:1", None, r"UTF-16 encoded .*re-save it as UTF-8"),
    "Latin-1 file": (_latin1, "latin1.jsonl:5", None, r"byte offset \d+ \(0xe9\) is not valid UTF-8.*Latin-1"),
    "Latin-1 CSV": (_latin1_csv, "latin1.csv:3", None, r"byte offset 33 \(0xe7\) is not valid UTF-8"),
    "empty file": (_empty, "empty.jsonl", None, r"the file is empty \(0 bytes\)"),
    "ragged CSV": (_ragged, "ragged.csv:3", None, r"the row has 3 fields but the header has 2 \(prompt, completion\)"),
    "non-string label": (_label_not_string, "label.jsonl:5", "label", r"'label' must be a string, got int 3"),
    "50 MB single line": (_long_line, "long.jsonl:2", None, r"the line is 52\.4 MB, longer than the limit"),
}


@pytest.mark.parametrize("case", list(CORPUS))
def test_bad_file_is_refused_precisely_and_changes_nothing(workspace, tmp_path, case):
    build, where, field, pattern = CORPUS[case]
    path = build(tmp_path)
    before = snapshot(workspace)
    with pytest.raises(InputError, match=pattern) as info:
        import_dataset(workspace, [path], "bad")
    msg = str(info.value)
    assert f"{tmp_path}/{where}" in msg, msg
    if field:
        assert info.value.field == field and f"field '{field}'" in msg
    assert snapshot(workspace) == before  # no ledger entry, no object, no artifact
    assert list(workspace.cache.glob("import-*")) == []  # scratch removed
    assert list(workspace.store.tmp.glob("*")) == []  # the source's staged copy was discarded
    assert verify_workspace(workspace).ok


def test_refusal_counts_the_other_errors(workspace, tmp_path):
    lines = GOOD[:2] + ["{bad json"] * 4 + ['{"prompt": "p", "completion": ""}'] + GOOD[2:]
    p = _lines(tmp_path, "many.jsonl", lines)
    with pytest.raises(InputError) as info:
        import_dataset(workspace, [p], "bad")
    msg = str(info.value)
    assert "many.jsonl:3: invalid JSON" in msg
    assert "and 4 more invalid rows" in msg and "many.jsonl:7 'completion' 'completion' is empty" in msg
    assert "--on-error skip" in msg


def test_skip_counts_every_skipped_row_by_reason(workspace, tmp_path):
    lines = (
        GOOD[:2]
        + ['{"prompt": "cut']
        + ['{"prompt": "p", "completion": 5}']
        + ["[1, 2]"]
        + ['{"prompt": "q"}']
        + GOOD[2:]
    )
    p = _lines(tmp_path, "mixed.jsonl", lines)
    art = import_dataset(workspace, [p], "mixed", on_error="skip")
    _, info, _ = open_dataset(workspace, art.ref)
    assert info["skipped"] == {"invalid_json": 1, "wrong_type": 1, "not_an_object": 1, "missing_field": 1}
    assert info["rows_in"] == 10 and info["rows_out"] == 6
    assert info["skipped_examples"]["invalid_json"] == [
        f"{p}:3: truncated JSON: Unterminated string starting at column 12"
    ]
    run = workspace.ledger.get_run(art.run_id)
    assert run.metrics["skipped"] == info["skipped"] and run.metrics["rows_in"] == 10


def test_skip_handles_latin1_line_and_long_line(workspace, tmp_path):
    p = _latin1(tmp_path)
    art = import_dataset(workspace, [p], "l1", on_error="skip", max_row_bytes=1 << 20)
    assert art.metadata["rows_out"] == 4
    _, info, _ = open_dataset(workspace, art.ref)
    assert info["skipped"] == {"encoding": 1}


def test_duplicate_rows_are_removed_and_reported(workspace, tmp_path):
    rows = completion_rows(10)
    rows = rows + [rows[2], rows[5], rows[2]]
    p = write_jsonl(tmp_path / "dups.jsonl", rows)
    art = import_dataset(workspace, [p], "dups")
    _, info, _ = open_dataset(workspace, art.ref)
    assert info["dropped"] == {"exact_duplicate": 3}
    assert info["duplicates"]["exact"] == 3
    assert info["duplicates"]["exact_examples"] == [
        f"{p}:11 repeats {p}:3",
        f"{p}:12 repeats {p}:6",
        f"{p}:13 repeats {p}:3",
    ]
    got = all_rows(workspace, art.ref)
    assert len(got) == 10 and len({json.dumps(r, sort_keys=True) for r in got}) == 10
    assert verify_workspace(workspace).ok


def test_truncated_json_array(workspace, tmp_path):
    p = tmp_path / "arr.json"
    p.write_text(json.dumps(completion_rows(3), indent=1)[:-30], encoding="utf-8")
    before = snapshot(workspace)
    with pytest.raises(InputError, match=r"arr.json:\d+: truncated JSON"):
        import_dataset(workspace, [p], "arr")
    assert snapshot(workspace) == before


def test_json_array_trailing_comma_is_refused_with_its_line(workspace, tmp_path):
    from finetrace.data.readers import ReadOptions, read_json_array

    p = tmp_path / "trail.json"
    p.write_text('[{"prompt": "a", "completion": "b"},\n {"prompt": "c", "completion": "d"},\n]', encoding="utf-8")
    items = list(read_json_array(p, ReadOptions(1 << 20, str(p))))
    assert [(line, rec) for line, rec, _ in items[:2]] == [
        (1, {"prompt": "a", "completion": "b"}),
        (2, {"prompt": "c", "completion": "d"}),
    ]
    line, rec, err = items[2]
    assert (line, rec, err.reason) == (3, None, "invalid_json") and "trailing comma" in err.message
    with pytest.raises(InputError, match=r"trail.json:3: invalid JSON: a trailing comma"):
        import_dataset(workspace, [p], "trail")
    ok = tmp_path / "ok.json"  # an empty array and a normal one still read
    ok.write_text("[]", encoding="utf-8")
    assert list(read_json_array(ok, ReadOptions(1 << 20, str(ok)))) == []
    ok.write_text('[{"a": 1} ]', encoding="utf-8")
    assert [rec for _, rec, _ in read_json_array(ok, ReadOptions(1 << 20, str(ok)))] == [{"a": 1}]


def test_no_rows_after_skip_is_an_error(workspace, tmp_path):
    p = _lines(tmp_path, "allbad.jsonl", ["{x", "{y"])
    with pytest.raises(InputError, match="no valid rows"):
        import_dataset(workspace, [p], "x", on_error="skip")
    assert workspace.ledger.artifacts() == []
