"""Hugging Face model folders: accept only safe, complete ones, and describe them for the ledger.

A folder is accepted when it has a ``config.json`` of a model type transformers knows (no custom code:
``auto_map`` is refused, nothing is ever loaded with ``trust_remote_code``), safetensors weights whose
headers are intact and whose data is all there, and a tokenizer. Pickle-format weights (``.bin``,
``.pt``, ``.pth``, ``.ckpt``, ``.pkl``) are refused: loading them can run arbitrary code.

Only the files a model needs are stored (``select_files``), so a folder's README, ``.git`` or training
leftovers do not change the digest of the model.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections import Counter
from pathlib import Path

from ..errors import InputError, NotFoundError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
KEEP_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt", ".model", ".tiktoken")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "I8": "int8",
    "U8": "uint8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, after checking the file holds every byte it declares."""
    file = str(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise InputError("truncated safetensors file (no header)", file=file)
        (n,) = struct.unpack("<Q", head)
        if n > 100 << 20 or 8 + n > size:
            raise InputError(f"corrupt or truncated safetensors header (claims {n} bytes, file has {size})", file=file)
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"corrupt safetensors header: {exc}", file=file) from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise InputError(
            f"truncated safetensors file: data ends at byte {8 + n + end}, the file has {size}",
            file=file,
            hint="download or copy the file again",
        )
    return header


def select_files(folder: Path) -> list[Path]:
    """The files of a model folder worth storing; InputError if the folder is not a usable model."""
    if not folder.is_dir():
        raise NotFoundError(f"no such folder: {folder}")
    top = sorted(p for p in folder.iterdir() if p.is_file())
    config = folder / "config.json"
    if not config.is_file():
        raise InputError("not a Hugging Face model folder: no config.json", file=str(folder))
    try:
        cfg = json.loads(config.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"config.json is not valid JSON: {exc}", file=str(config)) from None
    if cfg.get("auto_map"):
        raise InputError(
            "the model needs its own Python code (auto_map in config.json); finetrace never runs remote code",
            file=str(config),
            hint="use a model whose architecture transformers ships",
        )
    weights = [p for p in top if p.suffix == ".safetensors"]
    if not weights:
        pickled = [p.name for p in top if p.suffix in PICKLE_SUFFIXES]
        if pickled:
            raise InputError(
                f"weights are in pickle format ({', '.join(pickled[:3])}), which can run code when "
                "loaded; finetrace reads safetensors only",
                file=str(folder),
                hint="convert them with `safetensors` (or save_pretrained(safe_serialization=True))",
            )
        raise InputError("no *.safetensors weights in the folder", file=str(folder))
    for w in weights:
        read_safetensors_header(w)
    if not any((folder / t).is_file() for t in TOKENIZER_FILES):
        raise InputError(f"no tokenizer in the folder (expected one of {', '.join(TOKENIZER_FILES)})", file=str(folder))
    return [p for p in top if p.suffix in KEEP_SUFFIXES and not p.name.startswith(".")]


def stage(files: list[Path], dest: Path) -> Path:
    """Hard-link (or copy) ``files`` into the empty folder ``dest``, for storing exactly those files."""
    dest.mkdir(parents=True, exist_ok=False)
    for f in files:
        try:
            os.link(f, dest / f.name)
        except OSError:
            shutil.copyfile(f, dest / f.name)
    return dest


# duplicates: alike train/plan.py:read_shape on purpose (per-layer module shapes listed in the same order).
def describe(folder: Path) -> dict:
    """Ledger metadata for a model folder: architecture, sizes, dtype, context and text identity."""
    from transformers import AutoConfig, AutoTokenizer

    from .identity import text_identity

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:
        raise InputError(f"transformers cannot read config.json: {exc}", file=str(folder / "config.json")) from None
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, KeyError, OSError, TypeError) as exc:
        raise InputError(f"transformers cannot load the tokenizer: {exc}", file=str(folder)) from None
    params, dtypes = 0, Counter()
    for w in sorted(folder.glob("*.safetensors")):
        for name, t in read_safetensors_header(w).items():
            if name == "__metadata__":
                continue
            n = 1
            for d in t["shape"]:
                n *= d
            params += n
            dtypes[DTYPES.get(t["dtype"], t["dtype"].lower())] += n
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {
        "architecture": (config.architectures or [type(config).__name__])[0],
        "model_type": config.model_type,
        "parameters": params,
        "hidden_size": getattr(text, "hidden_size", None),
        "layers": getattr(text, "num_hidden_layers", None),
        "attention_heads": getattr(text, "num_attention_heads", None),
        "kv_heads": getattr(text, "num_key_value_heads", None),
        "vocab_size": getattr(text, "vocab_size", None),
        "context_length": getattr(text, "max_position_embeddings", None),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "dtype": dtypes.most_common(1)[0][0] if dtypes else None,
        "chat_template": bool(tok.chat_template),
        "bos_token": tok.bos_token,
        "pad_token": tok.pad_token,
        "text_identity": text_identity(tok),
    }
