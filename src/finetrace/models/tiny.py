"""A tiny, randomly initialised Llama-architecture model with a real BPE tokenizer and a ChatML template.

Built in about a second with no download, so that every test of training, evaluation and serving runs
on CPU in seconds. It has the same shape of interfaces as SmolLM2 (LlamaForCausalLM, ChatML, pad = eos
= ``<|im_end|>``), so the code paths exercised are the real ones.

    python -m finetrace.models.tiny OUT_DIR     # writes config, safetensors weights and tokenizer
"""

from __future__ import annotations

import sys
from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = """The quick brown fox jumps over the lazy dog. A contract is an agreement between parties.
The supplier shall deliver the goods within thirty days. The customer shall pay the invoice.
Personal data must be processed lawfully, fairly and in a transparent manner. Article 10 data governance.
Question: What is the capital of France? Answer: Paris. Label: yes no positive negative neutral.
Routing: billing, technical, account, shipping. Clause: termination, liability, confidentiality.
user assistant system hello world finetrace adapter model dataset train evaluate serve audit
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - = . , ; : ? ! ' " ( ) [ ] { }
abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ
"""


def build_tokenizer(
    vocab_size: int = 1000, special: list[str] | None = None, eos: str = "<|im_end|>", template: str = CHATML
):
    """A byte-level BPE tokenizer trained on a built-in corpus (deterministic), wrapped for transformers.
    ``special``/``eos``/``template`` give a model another chat format (special tokens get ids 0, 1, ...)."""
    special = special or SPECIAL
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=eos,
        pad_token=eos,
        unk_token=None,
        additional_special_tokens=[t for t in special if t != eos],
    )
    fast.chat_template = template
    return fast


def build_tiny_model(
    out_dir: str | Path, seed: int = 0, hidden_size: int = 64, layers: int = 2, vocab_size: int = 1000, tokenizer=None
) -> Path:
    """Write a tiny Llama model + tokenizer folder to ``out_dir`` and return it (``tokenizer``: another
    ``build_tokenizer(...)`` than the ChatML default)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer or build_tokenizer(vocab_size)
    cfg = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def random_lora(
    base_dir: str | Path,
    out_dir: str | Path,
    seed: int,
    r: int = 4,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    b_std: float = 0.5,
    **lora_kw,
) -> Path:
    """A PEFT LoRA adapter folder for the model in ``base_dir``, with B drawn from N(0, b_std) (0: peft's
    zero B, a no-op adapter), seeded: adapters that change outputs without training one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=r,
            lora_alpha=2 * r,
            target_modules=list(target_modules),
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            **lora_kw,
        ),
    )
    if b_std:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, b_std)
    out = Path(out_dir)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


if __name__ == "__main__":
    print(build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "tiny-model"))
