"""Examples/s of evaluate's batched greedy generation vs one-at-a-time ``model.generate``, same outputs.

    .venv/bin/python bench/eval_throughput.py                      # SmolLM2-135M-Instruct (catalog)
    .venv/bin/python bench/eval_throughput.py --model tiny         # the tiny test model (no download)

Both sides are greedy with the KV cache, the same ``GenerationConfig`` and the same decoding; the
baseline is plain transformers ``generate`` on one unpadded prompt at a time, the contender is
``finetrace.evaluate.generation.generate`` (length-sorted, left-padded batches). Prompts are the first
``--n`` clause texts of ``examples/clauses/test.csv`` rendered as classification prompts (the bundled
domain set). The last line printed is one JSON object: ``examples_per_s``, ``baseline_examples_per_s``,
``speedup``, ``identical_outputs`` (plus the settings).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prompts(n: int) -> list[list[dict]]:
    from finetrace.data.schemas import to_example

    path = ROOT / "examples" / "clauses" / "test.csv"
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    labels = sorted({r["label"] for r in rows})
    return [to_example(r, "classification", labels).messages for r in rows[:n]]


def load(model_name: str, ws_dir: Path):
    from finetrace.models import add_folder, add_model, load_model
    from finetrace.workspace import Workspace

    ws = Workspace.init(ws_dir)
    if model_name == "tiny":
        from finetrace.models.tiny import build_tiny_model

        art = add_folder(ws, build_tiny_model(ws_dir / "tiny-src"), "tiny")
    else:
        art = add_model(ws, model_name)
    model, tok, _ = load_model(ws, art.digest)
    return model, tok, art


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="catalog name, or 'tiny'")
    ap.add_argument("--n", type=int, default=32, help="prompts")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args(argv)

    import torch

    from finetrace.evaluate.generation import decode_answer, generate, generation_config, render

    with tempfile.TemporaryDirectory() as tmp:
        model, tok, art = load(args.model, Path(tmp) / "ws")
        ps = prompts(args.n)
        cfg = generation_config(tok, model, args.max_new_tokens)
        eos = set(cfg.eos_token_id)

        generate(model, tok, ps[:2], max_new_tokens=2, batch_size=2)  # warm-up (allocations, kernels)
        t0 = time.perf_counter()
        base_out, new_tokens = [], 0
        with torch.inference_mode():
            for p in ps:
                ids = tok(render(tok, p), return_tensors="pt", add_special_tokens=False)
                out = model.generate(**ids, generation_config=cfg)
                new = out[0, ids.input_ids.shape[1]:].tolist()
                new_tokens += len(new)
                base_out.append(decode_answer(tok, new, eos, ()))
        t_base = time.perf_counter() - t0

        t0 = time.perf_counter()
        batched = generate(model, tok, ps, max_new_tokens=args.max_new_tokens, stop=(),
                           batch_size=args.batch_size, progress=sys.stderr.isatty())
        t_batch = time.perf_counter() - t0

    same = batched == base_out
    diff = [i for i, (a, b) in enumerate(zip(batched, base_out)) if a != b]
    print(f"model {art.ref} ({art.digest[:19]}), {len(ps)} prompts, max_new_tokens {args.max_new_tokens}, "
          f"batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    print(f"one at a time: {t_base:.1f} s ({len(ps) / t_base:.2f} examples/s, {new_tokens / t_base:.1f} new tokens/s)")
    print(f"batched:       {t_batch:.1f} s ({len(ps) / t_batch:.2f} examples/s)")
    print(f"identical outputs: {same}" + (f" (differ at {diff[:10]})" if diff else ""))
    print(json.dumps({"examples_per_s": round(len(ps) / t_batch, 3),
                      "baseline_examples_per_s": round(len(ps) / t_base, 3),
                      "speedup": round(t_base / t_batch, 2), "identical_outputs": same,
                      "model": args.model, "n": len(ps), "batch_size": args.batch_size,
                      "max_new_tokens": args.max_new_tokens, "baseline_new_tokens": new_tokens,
                      "cpu_count": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
