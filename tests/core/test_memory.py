"""finetrace.memory: huge-page tensors and large blocks mapped on their own, in fresh interpreters (both
settings belong to a process: torch reads the first when it allocates its first tensor)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = [
    pytest.mark.skipif(
        not sys.platform.startswith("linux") or not THP.is_file() or "[never]" in THP.read_text(),
        reason="needs Linux with transparent huge pages (madvise or always)",
    ),
    pytest.mark.slow,  # four fresh interpreters
]

# Long-lived 6 MiB tensors amid 24 and 64 MiB transients: the pattern of a checkpointed decoder layer.
CHURN = """
import json, sys
from finetrace import memory
first = memory.prefer_huge_pages() if sys.argv[1] == "cli" else False
import torch
mapped = memory.map_large_blocks()
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
def huge():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
torch.ones(1)
r0, h0, kept = rss(), huge(), []
for i in range(60):
    for n in (6, 24, 64):
        torch.empty(n * 2**18).fill_(1.0)
    if i % 10 == 0:
        kept.append(torch.empty(6 * 2**18).fill_(0.0))
live = sum(t.numel() * 4 for t in kept)
print(json.dumps({"first": first, "mapped": mapped, "huge_pages": memory.huge_pages(), "grew": rss() - r0,
                  "huge_grew": huge() - h0, "live": live}), flush=True)
import os; os._exit(0)  # measured and printed: skip the interpreter's teardown
"""


def churn(mode: str, env: dict | None = None) -> dict:
    src = str(Path(__file__).resolve().parents[2] / "src")
    environ = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    environ["PYTHONPATH"] = src + os.pathsep + environ.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode],
        env={**environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_command_lines_process_gets_huge_pages_and_returns_freed_blocks():
    r = churn("cli")
    assert r["first"] and r["huge_pages"] and r["mapped"]
    assert r["huge_grew"] >= 6 * 2**20  # the kept tensors sit on 2 MiB pages
    # only what lives on stays resident (glibc's own heap keeps about 230 MiB here: measured 229-247 MiB)
    assert r["grew"] <= r["live"] + 16 * 2**20, r


def test_a_library_process_that_imported_torch_first_is_left_alone():
    r = churn("library")
    assert not r["huge_pages"] and not r["mapped"]
    assert r["huge_grew"] == 0


def test_a_user_setting_wins():
    r = churn("cli", {"THP_MEM_ALLOC_ENABLE": "0"})
    assert not r["first"] and not r["huge_pages"] and not r["mapped"]
    r = churn("library", {"THP_MEM_ALLOC_ENABLE": "1"})  # set before the process started: torch saw it
    assert r["huge_pages"] and r["mapped"] and r["huge_grew"] > 0
