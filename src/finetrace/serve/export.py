"""Exporting an adapter for other runtimes: a merged safetensors model that ``transformers`` loads.

    finetrace export-model legal@1 --merged -o legal-merged/ [--gguf f32|q8_0]

The merged weights are ``W = W0 + (alpha/r) B A`` for every LoRA layer (PEFT ``merge_and_unload``),
saved as safetensors with the base's tokenizer and chat template, and a ``finetrace_export.json`` naming
the base and adapter digests. The export is recorded as an ``export`` run (inputs: base + adapter) whose
output is a ``model`` artifact, so answers served from it elsewhere still trace back through the ledger.
The same checks as serving apply (base digest, tokenizer/chat-template identity, eval gates).

Serving the same adapters at scale needs no export: they are plain PEFT adapters
(``adapter_config.json`` + ``adapter_model.safetensors``), so after ``finetrace`` materialises them

    vllm serve BASE_DIR --enable-lora --max-loras 16 --max-lora-rank 64 \
        --lora-modules legal@1=/path/to/adapter other@2=/path/to/other

serves them batched on one base (Punica kernels), and LoRAX loads them per request from a local path
(``adapter_source="local"``, ``adapter_id=/path``). Keep the provenance by recording the deployment in
the ledger yourself (a ``deploy`` run with the base + adapter digests as inputs).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ..atomic import fsync_dir
from ..errors import InputError
from ..models import load_model
from ..models.identity import text_identity
from ..workspace import Workspace
from .registry import check_adapter


def export_merged(
    ws: Workspace, adapter: str, out_dir: str | Path, require_eval: bool = False, gguf: str | None = None
) -> dict:
    """Write the merged model of ``adapter`` (NAME@V, NAME or digest) to ``out_dir``; return a summary.

    ``gguf`` ("f32" or "q8_0") also writes ``model.gguf`` for llama.cpp / Ollama (see gguf_export.py).
    """
    import torch
    from peft import PeftModel

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} exists and is not empty", hint="choose a new folder for -o", field="-o")
    art = ws.ledger.resolve(adapter, kind="adapter")
    base_digest = art.metadata.get("base_model")
    if not base_digest:
        raise InputError(f"adapter {art.ref} records no base_model digest", hint="retrain it with finetrace")
    model, tok, base = load_model(ws, base_digest)
    info = check_adapter(ws, art.digest, base, text_identity(tok), require_eval)
    peft_model = PeftModel.from_pretrained(model, str(info.path), is_trainable=False)
    merged = peft_model.merge_and_unload(safe_merge=True)
    for p in merged.parameters():
        if not torch.isfinite(p).all():
            raise InputError(f"merging {art.ref} produced non-finite weights", hint="the adapter is corrupt")
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.build-"))
    try:
        merged.save_pretrained(build, safe_serialization=True)
        tok.save_pretrained(build)
        if gguf:
            from .gguf_export import write_gguf

            write_gguf(build, build / "model.gguf", name=f"{art.ref} merged on {base.ref}", qtype=gguf)
        (build / "finetrace_export.json").write_text(
            json.dumps(
                {
                    "format": "finetrace-export/1",
                    "kind": "merged",
                    "base_model": base.digest,
                    "base_ref": base.ref,
                    "adapter": art.digest,
                    "adapter_ref": art.ref,
                },
                indent=2,
                sort_keys=True,
            )
            + "\n"
        )
        if out.exists():
            out.rmdir()
        build.rename(out)
        fsync_dir(out.parent)
    finally:
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)
    with ws.ledger.run(
        "export", config={"kind": "merged", "adapter": art.ref, "gguf": gguf}, inputs=[base.digest, art.digest]
    ) as run:
        model_art = run.output(
            "model",
            ws.store.put_dir(out),
            name=f"{art.name or 'adapter'}-merged",
            metadata={"base_model": base.digest, "adapter": art.digest, "merged": True, **text_identity(tok)},
        )
    return {
        "path": str(out),
        "digest": model_art.digest,
        "ref": model_art.ref,
        "adapter": art.digest,
        "base_model": base.digest,
        "run": run.id,
    }
