"""The batched forward every caller shares: continuous batching of generations over a preallocated cache.

    dec = Decoder(model, tok)                            # adapters=GatheredLoRA(...) for mixed batches
    seqs = dec.run([Seq(encode_chat(tok, m), max_tokens=64) for m in prompts])   # evaluate, generate
    dec.add(seq); finished = dec.step()                  # the serving engine's scheduler, one step a call

A step (1) runs one chunk (``prefill_chunk`` tokens) of the prompts waiting to join, left-padded
together; a group whose prompts are all read picks its first tokens and joins the running rows;
(2) runs one decode step for every running row (one token each), picks every row's next token in one
batched call (``sampling.pick_tokens``), appends the new text and finishes rows at an end id
(``chat.end_ids``), a stop string, or ``max_tokens``. Long prompts are read a chunk per step, so they do
not stall the running rows. Rows carry their adapter name; ``adapters.select(names)`` sets the LoRA
slot of each row before a forward (``lora.GatheredLoRA``: one matmul pair when all rows share one).
Each step runs on the torch thread count ``threads.ThreadTuner`` picked by timing decode steps (and
restores the caller's count after it).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .chat import end_ids, pad_id
from .kvcache import compaction, slab_cache
from .lean import LeanLlama, lean_forward
from .lora import active_adapter
from .packed import decode_weights, round_to_fp16
from .prefix import DEFAULT_BYTES, PrefixCache
from .sampling import constrain_logits, make_generator, pick_tokens, token_logprobs
from .text import find_stop, holdback, normalise_answer
from .threads import ThreadTuner

BASE = "__base__"


@dataclass
class Seq:
    """One generation: what to do (the fields) and how far it got (``ids``, ``text``, ``finish``)."""

    prompt_ids: list[int]
    adapter: str = BASE
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: no logprobs; k >= 0: chosen token + top k
    normalise: bool = True  # a chat answer: streamed and returned as normalise_answer(text)
    on_delta: Callable[[str], None] | None = None
    owner: object = None  # the caller's request object
    constraint: object = None  # a sampling.TokenConstraint (JSON schema): masks each step's tokens
    # progress
    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None  # "stop" | "length" | "cancelled"
    end_token: int | None = None  # the end-of-turn id that ended it, if one did (not in ids)
    token_logprobs: list = field(default_factory=list)
    cancelled: bool = False
    pos: int = 0
    sent: int = 0
    gen: torch.Generator | None = None
    next_token: int | None = None

    @property
    def answer(self) -> str:
        return normalise_answer(self.text) if self.normalise else self.text


class _Group:
    """Prompts being read together (left-padded to one width), a chunk per step."""

    def __init__(self, seqs: list[Seq], pad: int, n_layers: int | None):
        self.seqs = seqs
        width = max(len(s.prompt_ids) for s in seqs)
        self.ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        self.mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            self.ids[i, width - len(s.prompt_ids) :] = torch.tensor(s.prompt_ids, dtype=torch.long)
            self.mask[i, width - len(s.prompt_ids) :] = 1
        self.pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.done = 0
        self.cache = slab_cache(n_layers)


class Decoder:
    """A model + tokenizer and the rows decoding on it; not thread-safe (one scheduler calls it)."""

    def __init__(
        self,
        model,
        tok,
        adapters=None,
        max_batch: int = 16,
        prefill_chunk: int = 256,
        weights: str | None = None,
        prefix_cache_bytes: int = DEFAULT_BYTES,
    ):
        self.model, self.tok, self.adapters = model, tok, adapters
        # the weight precision: packed.decode_weights(model) unless pinned; "fp16" rounds the model's own
        # weights in place on first use (packed.round_to_fp16), so every forward on it agrees
        self.weights = weights or decode_weights(model)
        if self.weights == "fp16":
            round_to_fp16(model)
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.end = end_ids(tok, model)
        self.pad = pad_id(tok)
        self.rows: list[Seq] = []
        self.waiting: list[Seq] = []
        self.groups: list[_Group] = []
        self.cache = None
        self.mask = None  # (b, t) over the cache
        if adapters is None:
            self.adapters = active_adapter(model)  # a PeftModel given no selector: its active adapter
        fwd = model.get_base_model().forward if hasattr(model, "get_base_model") else type(model).forward
        self._cache_kw = "cache" if "cache" in inspect.signature(fwd).parameters else "past_key_values"
        self._lean_key: tuple = ()
        self._lean: LeanLlama | None = None
        self.n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        self.tuner = ThreadTuner()  # the thread count of each step, chosen by timing decode steps
        self.prefixes = PrefixCache(prefix_cache_bytes)  # prompts already read, per adapter (prefix.py)

    # -- what callers use ----------------------------------------------------------------------
    @property
    def busy(self) -> int:
        return len(self.rows) + len(self.waiting) + sum(len(g.seqs) for g in self.groups)

    def free(self) -> int:
        return self.max_batch - self.busy

    def add(self, seq: Seq) -> None:
        seq.pos = len(seq.prompt_ids)
        seq.gen = make_generator(seq.seed) if seq.temperature > 1e-5 else None
        self.waiting.append(seq)

    def step(self) -> list[Seq]:
        """One chunk of prefill and one decode step; returns the sequences that finished in it."""
        finished: list[Seq] = []
        prev = torch.get_num_threads()
        try:
            with torch.inference_mode():
                if self.waiting:
                    g = _Group(self.waiting, self.pad, self.n_layers)
                    self._reuse_prefixes(g)
                    self.groups.append(g)
                    self.waiting = []
                if self.groups:
                    _set_threads(self.tuner.best)
                    finished += self._prefill(self.groups[0])
                if self.rows:
                    n = self.tuner.threads()
                    _set_threads(n)
                    t0 = time.perf_counter()
                    finished += self._decode()
                    self.tuner.record(n, time.perf_counter() - t0)
        finally:
            _set_threads(prev)  # the caller's setting outside the step
        return finished

    def run(self, seqs: list[Seq], on_done: Callable[[int], None] | None = None) -> list[Seq]:
        """Decode ``seqs`` to the end (continuous batching, ``max_batch`` rows at a time); returns them.
        ``on_done(n)`` is called after each step that finished ``n`` of them."""
        todo = list(seqs)[::-1]
        while todo or self.busy:
            while todo and self.free() > 0:
                self.add(todo.pop())
            n = len(self.step())
            if n and on_done is not None:
                on_done(n)
        return list(seqs)

    def reset(self) -> None:
        """Drop every row (after a failed forward)."""
        self.rows, self.waiting, self.groups, self.cache, self.mask = [], [], [], None, None

    # -- internals -----------------------------------------------------------------------------
    def lean(self) -> LeanLlama | None:
        """The lean forward (``lean.py``) for the current model and adapters, or None: the model's own."""
        if self._lean_key != (self.model, self.adapters):
            self._lean_key = (self.model, self.adapters)
            if self.weights == "fp16":  # every path (lean or the model's own forward) on the same weights
                round_to_fp16(self.model)
                if hasattr(self.adapters, "use_fp16"):
                    self.adapters.use_fp16()  # the adapters' stacks too
            self._lean = lean_forward(self.model, self.adapters, self.weights)
        return self._lean

    def forward(self, ids, mask, positions, cache, names: list[str], keep=None):
        """Logits of the last position (B, V), the cache updated in place, each row on its own adapter.
        ``keep``: an explicit (B, 1, q, t + q) boolean attention mask instead of ``mask`` + causal; then the
        logits of every position (B, q, V)."""
        kwargs = self.adapters.select(names) if self.adapters is not None else {}
        lean = self.lean()
        if lean is not None and not kwargs:
            return lean.forward(ids, mask, positions, cache.layers, keep)
        kwargs[self._cache_kw] = cache
        if keep is not None:
            dtype = next(self.model.parameters()).dtype
            attn = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
            out = self.model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True, **kwargs)
            return out.logits
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **kwargs
        )
        return out.logits[:, -1, :]

    @property
    def prefix_hit_tokens(self) -> int:
        """Prompt tokens not read again, thanks to the prefix cache."""
        return self.prefixes.hit_tokens

    def prefix_cache(self) -> PrefixCache:
        """The prefix cache, emptied first if the model or the adapters changed since its entries were made."""
        self.lean()  # the weights settled first: rounding the adapters to fp16 restacks them (a new version)
        self.prefixes.validate((self.model, self.adapters, getattr(self.adapters, "version", 0)))
        return self.prefixes

    def _reuse_prefixes(self, g: _Group) -> None:
        """Start ``g``'s cache with the cached keys and values of its prompts' known prefixes."""
        g.done = self.prefix_cache().seed(g.cache.layers, [s.adapter for s in g.seqs], [s.prompt_ids for s in g.seqs])

    def _prefill(self, g: _Group) -> list[Seq]:
        if any(s.cancelled for s in g.seqs) and all(s.cancelled for s in g.seqs):
            self.groups.pop(0)
            for s in g.seqs:
                s.finish = "cancelled"
            return list(g.seqs)
        end = min(g.done + self.prefill_chunk, g.ids.shape[1])
        logits = self.forward(
            g.ids[:, g.done : end], g.mask[:, :end], g.pos[:, g.done : end], g.cache, [s.adapter for s in g.seqs]
        )
        g.done = end
        if end < g.ids.shape[1]:
            return []
        self.groups.pop(0)
        self.prefixes.keep(g.cache.layers, [s.adapter for s in g.seqs], [s.prompt_ids for s in g.seqs])
        self._join(g)
        return self._accept(g.seqs, logits)

    def _join(self, g: _Group) -> None:
        if self.cache is None:
            self.cache, self.mask, self.rows = g.cache, g.mask, list(g.seqs)
            return
        ta, tn = self.mask.shape[1], g.mask.shape[1]
        for mine, theirs in zip(self.cache.layers, g.cache.layers):
            mine.append(theirs)
        t = max(ta, tn)
        self.mask = torch.cat(
            [torch.nn.functional.pad(self.mask, (t - ta, 0)), torch.nn.functional.pad(g.mask, (t - tn, 0))], dim=0
        )
        self.rows = self.rows + list(g.seqs)

    def _decode(self) -> list[Seq]:
        rows = self.rows
        ids = torch.tensor([[r.next_token] for r in rows], dtype=torch.long)  # (b, 1)
        positions = torch.tensor([[r.pos] for r in rows], dtype=torch.long)  # (b, 1)
        self.mask = torch.cat([self.mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
        logits = self.forward(ids, self.mask, positions, self.cache, [r.adapter for r in rows])
        for r in rows:
            r.pos += 1
        return self._accept(rows, logits)

    def _accept(self, rows: list[Seq], logits) -> list[Seq]:
        """Pick each row's next token, extend its text, finish rows; drop finished rows from the batch."""
        picked = constrain_logits(logits, [r.constraint for r in rows])
        toks = pick_tokens(picked, [r.temperature for r in rows], [r.top_p for r in rows], [r.gen for r in rows])
        want = [r.logprobs for r in rows if r.logprobs is not None]
        lps = token_logprobs(logits, toks, max(want)) if want else None
        for i, (r, t) in enumerate(zip(rows, toks)):
            if r.cancelled:
                r.finish = "cancelled"
                continue
            if t in self.end:
                r.finish, r.end_token = "stop", t
            else:
                r.ids.append(t)
                r.next_token = t
                if r.constraint is not None:
                    r.constraint.advance(t)
                    if r.constraint.finished:
                        r.finish = "stop"
                if lps is not None and r.logprobs is not None:
                    r.token_logprobs.append((t, lps[i][0], lps[i][1][: r.logprobs]))
            text = self.tok.decode(r.ids, skip_special_tokens=True)
            cut = find_stop(text, r.stop)
            if cut >= 0:
                text, r.finish = text[:cut], "stop"
            elif r.finish is None and len(r.ids) >= r.max_tokens:
                r.finish = "length"
            r.text = text
            # what may be streamed: a prefix of the final answer (chat: surrounding whitespace held back)
            view = normalise_answer(text) if r.normalise else text
            safe = view if r.finish else view[: len(view) - holdback(view, r.stop)]
            if r.on_delta is not None and len(safe) > r.sent:
                r.on_delta(safe[r.sent :])
            r.sent = max(r.sent, len(safe))
        done = [r for r in rows if r.finish]
        if done:
            self._prune()
        return done

    def _prune(self) -> None:
        keep = [i for i, r in enumerate(self.rows) if not r.finish]
        if len(keep) == len(self.rows):
            return
        keep = compaction(keep)  # few rows move: the finished ones' places are taken by the last rows
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return
        for layer in self.cache.layers:
            layer.keep_rows(keep)
        self.mask = self.mask[torch.tensor(keep, dtype=torch.long)]
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first >= 32 or (first > 0 and first * 4 >= self.mask.shape[1]):
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.drop_columns(first)


def _set_threads(n: int) -> None:
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
