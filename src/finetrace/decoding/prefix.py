"""Prefix caching: the keys and values of prompts already read, reused by later prompts that start alike.

Chat prompts repeat their beginnings: the template's system turn, a task's instructions, the earlier
turns of a conversation. Reading those tokens again costs a forward over every layer for each
request, which is most of the work when answers are short (a 37-token SmolLM2 chat prompt whose first
30 tokens every request shares, then 32 answer tokens). vLLM (automatic prefix caching, blocks of 16
tokens) and SGLang (RadixAttention, a token trie) keep those keys and values and skip the shared part.
This is the same idea at the size a CPU server needs: a bounded, least-recently-used set of whole
prompts, per adapter (a LoRA adapter changes every layer's keys and values, so prefixes are never
shared across adapters), matched token by token.

``lookup(adapter, ids)`` gives the longest cached prefix of ``ids`` (at most ``len(ids) - 1`` tokens: the
last prompt token is always read, for its logits) and the entry holding it; ``store`` keeps a prompt's
keys and values once it is read. The cache is emptied whenever what computed its entries may have
changed (``validate``: the model, the adapter selector or its version), so an adapter swapped under the
same name never sees the old one's prefixes.

Numbers: a cached token's keys and values are those computed when its prompt was first read; reading a
prompt in two parts computes the same values as reading it at once up to fp32 summation order, as
chunked prefill (``Decoder.prefill_chunk``) already does for long prompts.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

MIN_TOKENS = 8  # a shorter shared prefix is not worth a lookup
DEFAULT_BYTES = 256 * 2**20


def _size(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(k.nbytes + v.nbytes for k, v in layers)


class PrefixCache:
    """Cached prompts' per-layer keys and values, bounded by ``max_bytes`` (least recently used out first)."""

    def __init__(self, max_bytes: int = DEFAULT_BYTES):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[str, tuple[int, ...]], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.bytes = 0
        self.token: tuple = ()
        self.hit_tokens = 0  # prompt tokens ``seed`` filled from entries, since start (not reset by ``clear``)

    def validate(self, token: tuple) -> None:
        """Empty the cache when ``token`` (what computed the entries: model, adapters, their version) changed."""
        if token != self.token:
            self.clear()
            self.token = token

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def _match(self, adapter: str, ids: tuple, cap: int) -> tuple[int, tuple | None]:
        """(n, key): the entry of ``adapter`` sharing the longest prefix with ``ids`` (at most ``cap`` tokens)."""
        best, hit = 0, None
        for key in self.entries:
            toks = key[1]
            n = min(cap, len(toks))
            # an entry beats the best so far only if it agrees on one more token (tuple slices compare in C)
            if key[0] != adapter or n <= best or toks[: best + 1] != ids[: best + 1]:
                continue
            j = best + 1
            while j < n and toks[j] == ids[j]:
                j += 1
            best, hit = j, key
        return best, hit

    def lookup(self, adapter: str, ids: list[int]) -> tuple[int, list | None]:
        """(n, layers): the longest cached prefix of ``ids`` for ``adapter``, n tokens (0 if under
        ``MIN_TOKENS``), and the entry's per-layer (keys, values), each (kv_heads, >= n, head_dim)."""
        if self.max_bytes <= 0 or len(ids) <= MIN_TOKENS:
            return 0, None
        best, hit = self._match(adapter, tuple(ids), len(ids) - 1)
        if best < MIN_TOKENS or hit is None:
            return 0, None
        self.entries.move_to_end(hit)
        return best, self.entries[hit]

    def admit(self, adapter: str, ids: list[int]) -> bool:
        """Whether a prompt just read is worth an entry of its own. Not when it mostly repeats an entry
        (it shares more tokens with one than it adds: a system turn and a short question, whose shared
        part that entry serves already), so that many prompts on one adapter do not push out every other
        adapter's; an entry that is a prefix of it (the earlier turns of a conversation) is replaced."""
        if self.max_bytes <= 0 or len(ids) <= MIN_TOKENS:
            return False
        mine = tuple(ids)
        if (adapter, mine) in self.entries:
            self.entries.move_to_end((adapter, mine))
            return False
        shared, key = self._match(adapter, mine, len(mine))
        if key is None or shared < MIN_TOKENS:
            return True
        if shared == len(key[1]):  # the entry is a prefix of this prompt: this one serves all it served
            self.bytes -= _size(self.entries.pop(key))
            return True
        return len(mine) - shared >= shared

    def seed(self, layers: list, names: list[str], rows: list[list[int]]) -> int:
        """Fill the first columns of a fresh slab cache (``layers``: its ``SlabLayer``s) for ``rows``
        left-padded to one width W, from the cached prefixes; returns how many columns were filled.

        Row i (n_i tokens, cached prefix c_i) needs its last n_i - c_i columns read, so all rows read the
        last U = max(n_i - c_i) columns together and the first W - U come from the cache (padding, or a
        prefix of the row's cached tokens). 0 (nothing filled) when W - U < ``MIN_TOKENS``."""
        if self.max_bytes <= 0 or not layers or not self.entries:
            return 0
        width = max(len(r) for r in rows)
        hits = [self.lookup(n, r) for n, r in zip(names, rows)]
        pre = width - max(len(r) - c for r, (c, _) in zip(rows, hits))
        if pre < MIN_TOKENS:
            return 0
        first = next(e for _, e in hits if e is not None)
        for li, layer in enumerate(layers):
            k0 = first[li][0]
            keys = k0.new_zeros((len(rows), k0.shape[0], pre, k0.shape[2]))
            values = torch.zeros_like(keys)
            for i, (r, (_, e)) in enumerate(zip(rows, hits)):
                start = width - len(r)
                if e is not None and pre > start:
                    keys[i, :, start:pre] = e[li][0][:, : pre - start]
                    values[i, :, start:pre] = e[li][1][:, : pre - start]
            layer.update(keys, values)
        self.hit_tokens += sum(max(pre - (width - len(r)), 0) for r in rows)
        return pre

    def keep(self, layers: list, names: list[str], rows: list[list[int]], columns: list | None = None) -> None:
        """Store every row of a slab cache whose prompt was read: row i's tokens ``rows[i]`` are in its
        columns ``columns[i]`` (a slice, or a LongTensor of column indices); by default its last
        ``len(rows[i])`` columns (rows left-padded to the cache's width)."""
        if self.max_bytes <= 0 or not layers:
            return
        if columns is None:
            width = layers[0].t
            columns = [slice(width - len(r), width) for r in rows]
        for i, (n, r, cols) in enumerate(zip(names, rows, columns)):
            if self.admit(n, r):
                self.store(n, r, [(x.kbuf[i][:, cols].clone(), x.vbuf[i][:, cols].clone()) for x in layers])

    def store(self, adapter: str, ids: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep ``ids``' per-layer (keys, values), each (kv_heads, len(ids), head_dim), as one entry."""
        if self.max_bytes <= 0 or len(ids) <= MIN_TOKENS:
            return
        key = (adapter, tuple(ids))
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        size = _size(layers)
        if size > self.max_bytes:
            return
        self.entries[key] = layers
        self.bytes += size
        while self.bytes > self.max_bytes:
            self.bytes -= _size(self.entries.popitem(last=False)[1])
