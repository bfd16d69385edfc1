"""Cleaning, PII, splits, datasheet and the ledger record of an import."""

from __future__ import annotations

import json
import random
import unicodedata

import numpy as np
import pytest

from finetrace.data import diff, import_dataset, list_datasets, open_dataset, stats
from finetrace.data.clean import MinHasher, lsh_params
from finetrace.data.pii import DETECTORS, Span, detectors, iban_ok, luhn_ok, register_detector, scan
from finetrace.data.split import TEST, VALIDATION, assign
from finetrace.errors import ConfigError, InputError

from .dataset_files import all_rows, completion_rows, snapshot, write_jsonl


# -- PII ------------------------------------------------------------------------------------------
def test_pii_checksums():
    assert luhn_ok("4111 1111 1111 1111") and not luhn_ok("4111 1111 1111 1112")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and iban_ok("DE89370400440532013000")
    assert not iban_ok("GB82 WEST 1234 5698 7654 33")


def test_pii_detectors_find_each_type_and_skip_lookalikes():
    text = (
        "mail jane.doe@example.org, call +44 20 7946 0958 or (555) 123-4567, card 4111-1111-1111-1111, "
        "IBAN DE89 3704 0044 0532 0130 00, SSN 123-45-6789, host 10.0.0.12 or fe80::1ff:fe23:4567:890a. "
        "Not PII: card 4111 1111 1111 1112, SSN 000-12-3456, IP 999.1.1.1, year 2024, ratio 3.14"
    )
    found = [(text[s.start : s.end], s.type) for s in scan(text, detectors())]
    assert found == [
        ("jane.doe@example.org", "email"),
        ("+44 20 7946 0958", "phone"),
        ("(555) 123-4567", "phone"),
        ("4111-1111-1111-1111", "credit_card"),
        ("DE89 3704 0044 0532 0130 00", "iban"),
        ("123-45-6789", "us_ssn"),
        ("10.0.0.12", "ip_address"),
        ("fe80::1ff:fe23:4567:890a", "ip_address"),
    ]


PII_ROWS = [
    {"prompt": "Write to bob@corp.example about card 4111 1111 1111 1111", "completion": "Done."},
    {"prompt": "My SSN is 123-45-6789", "completion": "Never share it; your IP 192.168.1.20 is logged."},
    {"prompt": "Plain question one", "completion": "Plain answer one"},
    {"prompt": "Plain question two", "completion": "Plain answer two"},
]


def test_pii_redact_counts_and_replaces(workspace, tmp_path):
    art = import_dataset(workspace, [write_jsonl(tmp_path / "p.jsonl", PII_ROWS)], "pii", splits=(1, 0, 0))
    _, info, _ = open_dataset(workspace, art.ref)
    assert info["pii"]["counts"] == {"credit_card": 1, "email": 1, "ip_address": 1, "us_ssn": 1}
    assert info["pii"]["rows"] == 2
    texts = " ".join(r["prompt"] + " " + r["completion"] for r in all_rows(workspace, art.ref))
    assert "[EMAIL]" in texts and "[CREDIT_CARD]" in texts and "[US_SSN]" in texts and "[IP_ADDRESS]" in texts
    assert "bob@corp" not in texts and "4111" not in texts and "123-45" not in texts


def test_pii_flag_keeps_text_and_fail_refuses(workspace, tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", PII_ROWS)
    art = import_dataset(workspace, [p], "flag", pii="flag", splits=(1, 0, 0))
    assert any("bob@corp.example" in r["prompt"] for r in all_rows(workspace, art.ref))
    assert stats(workspace, art.ref)["pii"]["counts"]["email"] == 1
    before = snapshot(workspace)
    with pytest.raises(
        InputError,
        match=r"p.jsonl:1 field 'prompt': contains personal data \(credit_card, email\)"
        r" — and 1 more invalid row",
    ):
        import_dataset(workspace, [p], "fail", pii="fail")
    assert snapshot(workspace) == before


def test_custom_detector_plugs_in(workspace, tmp_path):
    class Codename:
        name = "codename"

        def find(self, text):
            i = text.find("PROJECT-X")
            return [Span(i, i + 9, "codename")] if i >= 0 else []

    register_detector(Codename())
    try:
        rows = [
            {"prompt": "Status of PROJECT-X?", "completion": "On track."},
            {"prompt": "Anything else", "completion": "No."},
        ]
        art = import_dataset(workspace, [write_jsonl(tmp_path / "c.jsonl", rows)], "cn", splits=(1, 0, 0))
        assert stats(workspace, art.ref)["pii"]["counts"] == {"codename": 1}
        assert any(r["prompt"] == "Status of [CODENAME]?" for r in all_rows(workspace, art.ref))
    finally:
        DETECTORS.pop("codename")


def test_presidio_is_optional_with_an_install_hint():
    from finetrace.data.pii import PresidioDetector
    from finetrace.errors import DependencyError

    try:
        import presidio_analyzer  # noqa: F401
    except ImportError:
        with pytest.raises(DependencyError, match="presidio-analyzer"):
            PresidioDetector()
    else:  # installed here: it must behave as a detector
        assert PresidioDetector().name == "presidio"


# -- normalisation and near-duplicates ------------------------------------------------------------
def test_nfc_and_whitespace_normalisation(workspace, tmp_path):
    decomposed = unicodedata.normalize("NFD", "Crème brûlée")
    rows = [{"prompt": f"  {decomposed}\r\nplease ", "completion": "ok"}, {"prompt": "other", "completion": "x"}]
    art = import_dataset(workspace, [write_jsonl(tmp_path / "n.jsonl", rows)], "nfc", splits=(1, 0, 0))
    got = {r["prompt"] for r in all_rows(workspace, art.ref)}
    assert "Crème brûlée\nplease" in got and unicodedata.is_normalized("NFC", "".join(got))
    assert stats(workspace, art.ref)["normalized_rows"] == 1


def _essay(rng, n_words=120):
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(n_words)
    ]
    return " ".join(words)


def test_minhash_finds_near_duplicates_not_strangers(tmp_path):
    rng = random.Random(0)
    base = [_essay(rng) for _ in range(50)]
    near = base[7][:-12] + " tail"  # a small edit of row 7
    m = MinHasher(0.8, tmp_path)
    m.add(base + [near])
    pairs = m.pairs(np.ones(51, bool))
    assert [(a, b) for a, b, _ in pairs] == [(7, 50)] and pairs[0][2] >= 0.8
    assert lsh_params(0.8) == (7, 9)


def test_near_duplicates_never_cross_splits(workspace, tmp_path):
    rng = random.Random(1)
    rows = [{"prompt": _essay(rng, 60), "completion": f"answer {i}"} for i in range(40)]
    # 10 near-duplicate copies of rows 0..9 (one word changed)
    rows += [
        {"prompt": r["prompt"].replace(r["prompt"].split()[5], "changed", 1), "completion": r["completion"]}
        for r in rows[:10]
    ]
    art = import_dataset(workspace, [write_jsonl(tmp_path / "nd.jsonl", rows)], "nd", seed=3, splits=(0.5, 0.25, 0.25))
    _, info, _ = open_dataset(workspace, art.ref)
    assert info["duplicates"]["near"] == 10 and info["duplicates"]["near_clusters"] == 10
    split_of = {}
    for split in ("train", "validation", "test"):
        from finetrace.data import read_split

        for r in read_split(workspace, art.ref, split).to_pylist():
            split_of.setdefault(r["completion"], set()).add(split)
    assert len(split_of) == 40 and all(len(s) == 1 for s in split_of.values())  # each pair in one split
    assert info["rows_out"] == 50
    dropped = import_dataset(workspace, [tmp_path / "nd.jsonl"], "nd-drop", near_dup="drop")
    assert dropped.metadata["rows_out"] == 40
    assert open_dataset(workspace, dropped.ref)[1]["dropped"] == {"near_duplicate": 10}


# -- splits ---------------------------------------------------------------------------------------
def test_split_assign_is_deterministic_stratified_and_exact():
    n = 1000
    keys = np.arange(n, dtype=np.uint64) * np.uint64(2654435761)
    strata = np.array([0] * 700 + [1] * 200 + [2] * 100)
    units = np.arange(n)
    a = assign(units, keys, strata, (0.8, 0.1, 0.1), seed=0)
    assert np.array_equal(a, assign(units, keys, strata, (0.8, 0.1, 0.1), seed=0))
    assert not np.array_equal(a, assign(units, keys, strata, (0.8, 0.1, 0.1), seed=1))
    for s, size in ((0, 700), (1, 200), (2, 100)):
        got = a[strata == s]
        assert (got == TEST).sum() == round(size * 0.1) and (got == VALIDATION).sum() == round(size * 0.1)
    # the assignment follows content, not position
    perm = np.random.default_rng(0).permutation(n)
    b = assign(units, keys[perm], strata[perm], (0.8, 0.1, 0.1), seed=0)
    assert np.array_equal(b, a[perm])


def test_import_split_deterministic_and_stratified(workspace, tmp_path):
    rows = [
        {
            "text": f"message {i} about {['billing', 'tech', 'sales'][i % 3]}",
            "label": ["billing", "tech", "sales"][i % 3],
        }
        for i in range(90)
    ]
    p = write_jsonl(tmp_path / "cls.jsonl", rows)
    a1 = import_dataset(workspace, [p], "cls", seed=7, splits=(0.6, 0.2, 0.2))
    a2 = import_dataset(workspace, [p], "cls", seed=7, splits=(0.6, 0.2, 0.2))
    assert a1.digest == a2.digest and a2.ref == "cls@1"  # same input, same seed: same version
    a3 = import_dataset(workspace, [p], "cls", seed=8, splits=(0.6, 0.2, 0.2))
    assert a3.digest != a1.digest and a3.ref == "cls@2"
    _, info, _ = open_dataset(workspace, "cls@1")
    assert info["counts"] == {"train": 54, "validation": 18, "test": 18}
    assert info["label_counts"]["test"] == {"billing": 6, "tech": 6, "sales": 6}
    assert info["label_counts"]["train"] == {"billing": 18, "tech": 18, "sales": 18}
    d = diff(workspace, "cls@1", "cls@2")
    assert d["rows"] == {"from": 90, "to": 90, "added": 0, "removed": 0, "common": 90}
    assert d["splits"]["test"]["added"] > 0


def test_groups_stay_together(workspace, tmp_path):
    rows = [
        {"prompt": f"turn {i} of conversation {i // 5}", "completion": f"reply {i}", "group": f"c{i // 5}"}
        for i in range(100)
    ]
    art = import_dataset(workspace, [write_jsonl(tmp_path / "g.jsonl", rows)], "grp", split_unit="group")
    from finetrace.data import read_split

    where = {}
    for split in ("train", "validation", "test"):
        for r in read_split(workspace, art.ref, split).to_pylist():
            where.setdefault(r["group"], set()).add(split)
    assert len(where) == 20 and all(len(s) == 1 for s in where.values())


def test_group_is_only_a_label_by_default(workspace, tmp_path):
    """A demographic ``group`` (for disaggregated metrics) must not decide splits or drop rows."""
    from finetrace.data import read_split

    rows = [
        {
            "prompt": f"question number {i} about topic {i * 7919 % 1000}",
            "completion": f"answer {i}",
            "group": "EU" if i % 2 else "US",
        }
        for i in range(200)
    ]
    held = [
        {
            "prompt": f"held-out question {i} on subject {i * 104729 % 1000}",
            "completion": f"reply {i}",
            "group": "EU" if i % 2 else "US",
        }
        for i in range(20)
    ]
    art = import_dataset(
        workspace, [write_jsonl(tmp_path / "d.jsonl", rows)], "demo", test_file=write_jsonl(tmp_path / "t.jsonl", held)
    )
    train = read_split(workspace, art.ref, "train").to_pylist()
    test = read_split(workspace, art.ref, "test").to_pylist()
    assert {r["group"] for r in train} == {r["group"] for r in test} == {"EU", "US"}
    assert len(test) == 20 and len(train) + len(read_split(workspace, art.ref, "validation")) == 200


def test_held_out_test_file(workspace, tmp_path):
    rng = random.Random(5)
    rows = [{"prompt": _essay(rng, 30), "completion": f"answer {i}"} for i in range(50)]
    rows, test_rows = rows[:40], rows[40:] + [rows[0]]  # rows[0] also in the held-out file: must not leak
    art = import_dataset(
        workspace,
        [write_jsonl(tmp_path / "main.jsonl", rows)],
        "ho",
        test_file=write_jsonl(tmp_path / "held.jsonl", test_rows),
    )
    _, info, _ = open_dataset(workspace, art.ref)
    from finetrace.data import read_split

    test = read_split(workspace, art.ref, "test").to_pylist()
    assert sorted(r["prompt"] for r in test) == sorted(r["prompt"] for r in test_rows)
    assert info["dropped"] == {"duplicate_of_test": 1}
    assert info["counts"]["train"] + info["counts"]["validation"] == 39
    assert info["counts"]["validation"] == round(39 * 0.1 / 0.9)
    assert [s["role"] for s in info["sources"]] == ["test", "data"]


def test_bad_fractions(workspace, tmp_path):
    with pytest.raises(ConfigError, match="sum to 1"):
        import_dataset(workspace, [write_jsonl(tmp_path / "x.jsonl", completion_rows(3))], "x", splits=(0.5, 0.1, 0.1))


# -- datasheet and ledger record ------------------------------------------------------------------
def test_datasheet_gaps_and_measured(workspace, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "question": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    ds = tmp_path / "sheet.yaml"
    ds.write_text(
        "source: support tickets export\nowner: ACME support\nlicence: internal\npersonal_data: true, redacted\n",
        encoding="utf-8",
    )
    art = import_dataset(
        workspace,
        [write_jsonl(tmp_path / "d.jsonl", completion_rows(20))],
        "sheet",
        datasheet=ds,
        tokenizer=str(tok_dir),
    )
    folder, info, _ = open_dataset(workspace, art.ref)
    sheet = json.loads((folder / "datasheet.json").read_text())
    assert sheet["given"] == {
        "source": "support tickets export",
        "owner": "ACME support",
        "license": "internal",
        "personal_data": "true, redacted",
    }
    assert sheet["gaps"] == [
        "collection_method",
        "collection_period",
        "annotation_process",
        "copyrighted",
        "purchased_or_licensed",
        "synthetic",
        "intended_use",
    ]
    assert art.metadata["gaps"] == sheet["gaps"]
    m = sheet["measured"]
    assert m["rows_out"] == 20 and m["splits"] == info["counts"]
    tl = m["token_lengths"]
    # "Question number 7: what is 7 times three?\nThe answer is 21." -> 10 + 5 word/punctuation tokens
    assert tl["count"] == 20 and tl["min"] == tl["max"] == 15 and tl["histogram"]["0-31"] == 20
    from finetrace.data.datasheet import render

    text = render(sheet, art.ref)
    assert "Gaps (required, not provided" in text and "  intended_use: what the dataset is meant for" in text
    assert "  owner: ACME support" in text


def test_datasheet_unknown_key_suggests(workspace, tmp_path):
    ds = tmp_path / "sheet.yaml"
    ds.write_text("licnse: MIT\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown datasheet field 'licnse'.*did you mean 'license'"):
        import_dataset(workspace, [write_jsonl(tmp_path / "d.jsonl", completion_rows(3))], "x", datasheet=ds)


def test_import_run_records_sources_transforms_and_counts(workspace, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", completion_rows(10))
    b = write_jsonl(tmp_path / "b.jsonl", completion_rows(14)[10:])
    art = import_dataset(workspace, [a, b], "rec", seed=5)
    run = workspace.ledger.get_run(art.run_id)
    assert run.kind == "import" and run.status == "succeeded"
    sources = [workspace.ledger.artifact(d) for d in run.inputs]
    assert [s.kind for s in sources] == ["source", "source"]
    assert {s.metadata["filename"] for s in sources} == {"a.jsonl", "b.jsonl"}
    assert workspace.store.read_bytes(sources[0].digest) in (a.read_bytes(), b.read_bytes())
    assert [t["op"] for t in run.config["transforms"]] == [
        "read",
        "map",
        "validate",
        "normalize",
        "pii",
        "dedup_exact",
        "near_duplicates",
        "split",
    ]
    assert run.config["seed"] == 5 and run.metrics["rows_in"] == 14 and run.metrics["rows_out"] == 14
    assert run.outputs == [art.digest]
    assert [d["ref"] for d in list_datasets(workspace)] == ["rec@1"]
    from finetrace.ledger import lineage, verify_workspace

    assert verify_workspace(workspace).ok
    assert lineage  # lineage queries exist over these edges (used by audit)
