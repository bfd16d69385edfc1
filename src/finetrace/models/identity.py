"""The identity of a model's text interface: tokenizer, chat template and end-of-turn token.

An adapter is only valid on the base it was trained on, with the same tokenizer and chat template.
Training records this fingerprint with the adapter; serving and pulling compare it with the running base.
"""

from __future__ import annotations

from ..canonical import sha256_bytes


def text_identity(tokenizer) -> dict:
    """``{"tokenizer_sha256", "chat_template_sha256", "eos_token", "eos_token_id"}`` of a HF tokenizer."""
    vocab = tokenizer.get_vocab()
    vocab_text = "\n".join(f"{t}\t{i}" for t, i in sorted(vocab.items(), key=lambda kv: kv[1]))
    template = getattr(tokenizer, "chat_template", None) or ""
    return {
        "tokenizer_sha256": sha256_bytes(vocab_text.encode("utf-8")),
        "chat_template_sha256": sha256_bytes(template.encode("utf-8")),
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
    }


def mismatches(expected: dict, actual: dict) -> list[str]:
    """Names of identity fields that differ (ignoring fields absent from ``expected``)."""
    return [k for k, v in expected.items() if k in actual and actual[k] != v]
