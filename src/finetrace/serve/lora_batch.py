"""Gathered LoRA now lives in the decoding core (``finetrace.decoding.lora``), shared with evaluation."""

from ..decoding.lora import GatheredLoRA, PeftMixed, adapter_selector  # noqa: F401
