"""Content-addressed store: digests, dedup, folders, atomicity, corruption detection."""

import os
import signal
import subprocess
import sys
import time

import pytest

from finetrace.canonical import sha256_bytes
from finetrace.errors import IntegrityError
from finetrace.store import ObjectStore


def test_put_bytes_file_and_dedup(tmp_path):
    st = ObjectStore(tmp_path / "objects")
    d1 = st.put_bytes(b"hello")
    assert d1 == sha256_bytes(b"hello") == "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    f = tmp_path / "f.txt"
    f.write_bytes(b"hello")
    assert st.put_file(f) == d1
    assert list(st) == [d1]
    assert st.read_bytes(d1) == b"hello"
    assert oct(st.path(d1).stat().st_mode & 0o777) == "0o444"


def test_folder_manifest_is_canonical_and_materializes(tmp_path):
    st = ObjectStore(tmp_path / "objects")
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "a.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(os.urandom(1000))
    d = st.put_dir(src)
    assert st.is_tree(d) and not st.is_tree(st.put_bytes(b"{}"))
    assert [e.path for e in st.tree(d)] == ["a.json", "sub/w.bin"]
    # the same content elsewhere gives the same digest
    other = tmp_path / "copy"
    (other / "sub").mkdir(parents=True)
    (other / "a.json").write_text("{}")
    (other / "sub" / "w.bin").write_bytes((src / "sub" / "w.bin").read_bytes())
    assert st.put_dir(other) == d
    out = st.materialize(d)
    assert (out / "sub" / "w.bin").read_bytes() == (src / "sub" / "w.bin").read_bytes()
    assert st.size(d) == 1002


def test_one_folder_digest_rule_in_memory_on_disk_and_stored(tmp_path):
    """put_dir, folder_digest (pipeline cache keys) and tree_digest (the bundle verifier) agree, and the
    rule is the persisted one: a pinned digest of a pinned folder (ledgers name folders by it)."""
    from finetrace.pipeline.cache import file_digest
    from finetrace.store import folder_digest, tree_digest

    src = tmp_path / "f"
    (src / "sub").mkdir(parents=True)
    (src / "b.txt").write_bytes(b"b")
    (src / "sub" / "a.txt").write_bytes(b"aa")
    files = {"b.txt": b"b", "sub/a.txt": b"aa"}
    stored = ObjectStore(tmp_path / "objects").put_dir(src)
    assert folder_digest(src) == tree_digest(files) == file_digest(src) == stored
    assert stored == "sha256:e3d782c26855551902aca5603ae036f11dae8a59a73d4acbeeca868ba6664439"
    assert tree_digest({**files, "b.txt": b"c"}) != stored
    assert tree_digest({"c.txt": b"b", "sub/a.txt": b"aa"}) != stored


def test_corruption_is_detected_on_read_for_use(tmp_path):
    st = ObjectStore(tmp_path / "objects")
    src = tmp_path / "m"
    src.mkdir()
    (src / "w").write_bytes(b"weights" * 100)
    d = st.put_dir(src)
    inner = st.tree(d)[0].digest
    p = st.path(inner)
    os.chmod(p, 0o644)
    data = bytearray(p.read_bytes())
    data[3] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=inner):
        st.materialize(d)


KILLED_WRITER = """
import sys, time
from finetrace.store import ObjectStore
st = ObjectStore(sys.argv[1])
st.put_file(sys.argv[2])
"""


def test_write_killed_midway_leaves_no_object(tmp_path):
    fifo = tmp_path / "slow"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "objects"), str(fifo)])
    deadline = time.monotonic() + 60
    while True:  # wait for the writer to open the pipe, without blocking forever if it died
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert proc.poll() is None, "the writer exited before reading"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    os.set_blocking(fd, True)
    os.write(fd, os.urandom(1 << 20))  # blocks until the writer has consumed most of it
    time.sleep(0.3)
    assert proc.poll() is None  # still waiting for the rest of the file
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    os.close(fd)
    st = ObjectStore(tmp_path / "objects")
    assert list(st) == []  # nothing visible under a digest name
    leftovers = list((tmp_path / "objects" / "tmp").glob("*.part"))
    assert all(p.name.endswith(".part") for p in leftovers)
