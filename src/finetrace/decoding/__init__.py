"""The one decoder: evaluate, serve and ``generate`` all decode through this package.

    chat.py     chat-template rendering; end-of-answer ids from the model's template and generation config
    text.py     stop strings, streaming hold-back, the one answer normalisation
    sampling.py batched greedy / temperature + top-p sampling with per-row seeds; token logprobs
    kvcache.py  a preallocated KV cache (rows written in place, no per-step copies)
    batch.py    ``Decoder``: continuous batching with chunked prefill, rows on their own adapters
    lean.py     the decode forward for Llama-family models (the model's own forward for anything else)
    packed.py   fp16-stored, fp32-computed weights for lean.py (fbgemm), q/k/v and gate/up fused
    lora.py     gathered LoRA: a mixed-adapter batch at one matmul pair per layer
    threads.py  the thread count of decode steps, chosen by timing them (shared CPUs)
    labels.py   label scoring (constrained classification), batched across prompts and adapters

So what the gates certify (evaluate) is token for token what is served and what ``generate`` prints.
"""

from .batch import BASE, Decoder, Seq
from .chat import encode_chat, encode_text, end_ids, render, turn_end_id
from .labels import best_label, score_prompts
from .text import cut_at_stop, normalise_answer

__all__ = [
    "BASE",
    "Decoder",
    "Seq",
    "best_label",
    "cut_at_stop",
    "encode_chat",
    "encode_text",
    "end_ids",
    "normalise_answer",
    "render",
    "score_prompts",
    "turn_end_id",
]
