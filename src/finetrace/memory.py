"""How finetrace's processes take memory from the operating system for large CPU tensors.

PyTorch's CPU allocator asks glibc's ``malloc`` for every tensor. Two defaults of that pair cost a training
step on a CPU time and memory, and neither is ours to fix inside PyTorch, so the process sets them:

- **Pages.** A fresh 64 MiB tensor is faulted in 4 KiB page by page. PyTorch can instead align tensors of
  2 MiB and more and mark them for transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``, read once, when
  torch allocates its first tensor), 512 times fewer faults. Measured here (``bench/train_scale.py`` and
  a 6/24/64 MiB allocate-and-fill loop): the loop takes 1.7 s instead of 4.4 s.
- **Heap.** glibc raises its ``mmap`` threshold each time a mapped block is freed (up to 32 MiB), so the
  activations of a checkpointed decoder layer soon come from the heap, where the few that live on (each
  layer's output) pin the freed ones around them: RSS grew about 21 MiB a layer more than the live
  tensors on Llama-3.2-1B's shape (``malloc_trim`` returned it). A fixed threshold of 1 MiB
  (``mallopt(M_MMAP_THRESHOLD)``) maps every large block on its own and returns it to the system when
  freed. On its own that would make every large tensor fault afresh, so it is set only together with huge
  pages; and only for models whose activations are large (hidden size 2048 and up): a small model churns
  many 1-4 MiB tensors, and mapping each afresh made SmolLM2-135M's quickstart training 27% slower
  (162 s against 128 s, the same steps), while huge pages alone left it unchanged (130 s).

``prefer_huge_pages`` is called by the command line before anything imports torch;
``map_large_blocks_for`` by the trainer. Neither changes a number that training computes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

THP_ENV = "THP_MEM_ALLOC_ENABLE"
MMAP_THRESHOLD = 1 << 20  # bytes: blocks at least this large are mapped on their own
MAP_FROM_HIDDEN = 2048  # hidden size from which the trainer maps large blocks (Llama-3.2-1B: 2048)
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
_huge_pages_before_torch = False


def prefer_huge_pages() -> bool:
    """Ask PyTorch for 2 MiB-aligned, huge-page tensors (unless the user set ``THP_MEM_ALLOC_ENABLE``).
    Only effective before torch is imported; returns whether this process will have them."""
    global _huge_pages_before_torch
    if "torch" not in sys.modules:
        os.environ.setdefault(THP_ENV, "1")
        _huge_pages_before_torch = os.environ[THP_ENV] == "1"
    return huge_pages()


def huge_pages() -> bool:
    """Whether PyTorch in this process allocates large tensors on huge pages (as far as we can know: the
    variable was set before torch was imported, here or by whoever started the process)."""
    return _huge_pages_before_torch or (os.environ.get(THP_ENV) == "1" and _set_before_start())


def _set_before_start() -> bool:
    try:
        with open("/proc/self/environ", "rb") as fh:
            return f"{THP_ENV}=1".encode() in fh.read().split(b"\0")
    except OSError:
        return False


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (present only in glibc)
    except (OSError, AttributeError):
        return None
    return libc


def map_large_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes when huge pages are on (see the module docstring).
    Returns whether it was set; elsewhere (another libc, no huge pages) nothing changes."""
    libc = _glibc()
    if libc is None or not huge_pages():
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))


def map_large_blocks_for(hidden_size: int) -> bool:
    """``map_large_blocks`` for training a model of this hidden size, if it is large enough to gain."""
    return hidden_size >= MAP_FROM_HIDDEN and map_large_blocks()
