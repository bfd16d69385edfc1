"""Constrained decoding: a JSON schema compiled to a token-level grammar, so the answer always parses and
validates (``response_format``, forced tool calls).

    grammar = compile_json_schema(tok, {"type": "object", ...})   # InputError naming the field if unusable
    seq.constraint = JsonConstraint(tok, grammar, vocab_size, end_ids)

The grammar engine is llguidance (``pip install 'finetrace[structured]'``): it turns the schema into a
grammar over the tokenizer's own vocabulary and, at each step, gives the set of tokens that keep the text
a prefix of some valid document. The decoder asks each constrained row for that set through the
``sampling.TokenConstraint`` hook and masks every other token to -inf before sampling. The end-of-answer
ids are allowed only once the document is complete, and the row ends when the grammar admits nothing
more. JSON is written without optional whitespace (``{"a":1}``): a model can therefore not pad forever.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from ..errors import DependencyError, InputError

EXTRA = "structured"


def _llg():
    try:
        import llguidance
    except ImportError as exc:
        raise DependencyError(
            "constrained decoding (response_format json_object/json_schema, forced tool calls) "
            "needs the llguidance package",
            hint=f"pip install 'finetrace[{EXTRA}]' (scripts/install.sh installs it)",
        ) from exc
    return llguidance


def _lltokenizer(tok, vocab_size: int, end_ids) -> Any:
    """llguidance's view of ``tok`` (built once per tokenizer, vocabulary size and end ids: ~1 s)."""
    key = (vocab_size, tuple(sorted(end_ids)))
    cache = getattr(tok, "_ft_llg", None)
    if cache is not None and cache[0] == key:
        return cache[1]
    llg = _llg()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise InputError(
            "constrained decoding needs a fast (Rust `tokenizers`) tokenizer",
            hint="serve a model whose folder has tokenizer.json",
        )
    from copy import copy

    backend = copy(backend)
    backend.no_padding()
    backend.no_truncation()
    lltok = llg.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=sorted(end_ids))
    tok._ft_llg = (key, lltok)
    return lltok


def schema_grammar(schema: dict) -> str:
    """The llguidance grammar (a JSON string) of a JSON schema, compact JSON, unknown keywords refused."""
    llg = _llg()
    try:
        return llg.LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
        )
    except (ValueError, TypeError) as exc:
        raise InputError(f"the JSON schema is not usable: {exc}", field="response_format.json_schema.schema") from None


def compile_json_schema(
    tok, schema: dict, vocab_size: int, end_ids, field: str = "response_format.json_schema.schema"
) -> str:
    """Check that ``schema`` compiles for ``tok``; returns the grammar. Raises InputError naming ``field``."""
    if not isinstance(schema, dict):
        raise InputError("a JSON schema must be a JSON object", field=field)
    try:
        json.dumps(schema)
    except (TypeError, ValueError):
        raise InputError("the JSON schema is not JSON", field=field) from None
    grammar = schema_grammar(schema)
    llg = _llg()
    bad, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, _lltokenizer(tok, vocab_size, end_ids))
    if bad:
        raise InputError(
            f"the JSON schema cannot be enforced: {messages[0] if messages else 'invalid'}",
            hint="use the JSON Schema keywords of draft 2020-12 that llguidance supports",
            field=field,
        )
    return grammar


_BITS = torch.arange(32, dtype=torch.int32)


class JsonConstraint:
    """One row's grammar state: ``allowed()`` -> bool (V,), ``advance(token)``, ``finished``."""

    def __init__(self, tok, grammar: str, vocab_size: int, end_ids):
        llg = _llg()
        self.vocab_size = vocab_size
        self.matcher = llg.LLMatcher(_lltokenizer(tok, vocab_size, end_ids), grammar, log_level=0)
        if self.matcher.is_error():
            raise InputError(f"the grammar is not usable: {self.matcher.get_error()}", field="response_format")

    def allowed(self) -> torch.Tensor:
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)  # (ceil(V/32),)
        bits = (words[:, None] >> _BITS[None, :]) & 1  # (W, 32)
        return bits.reshape(-1)[: self.vocab_size].bool()

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise RuntimeError(f"constrained decoding took a token the grammar refuses: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """Nothing more can follow: the document is complete (the row ends without an end token)."""
        return self.matcher.is_stopped()
