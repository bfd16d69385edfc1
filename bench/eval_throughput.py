"""Examples/s of evaluate's batched greedy generation vs one-at-a-time ``model.generate``, same outputs;
and of constrained label scoring (base + tuned + bias variants) vs scoring one (prompt, label) at a time.

    .venv/bin/python bench/eval_throughput.py                      # SmolLM2-135M-Instruct (catalog)
    .venv/bin/python bench/eval_throughput.py --model tiny         # the tiny test model (no download)

Both sides are greedy with the KV cache, the same ``GenerationConfig`` and the same decoding; the
baseline is plain transformers ``generate`` on one unpadded prompt at a time, the contender is
``finetrace.evaluate.generation.generate`` (length-sorted, left-padded batches). Prompts are the first
``--n`` clause texts of ``examples/clauses/test.csv`` rendered as classification prompts (the bundled
domain set). The last line printed is one JSON object: ``examples_per_s``, ``baseline_examples_per_s``,
``speedup``, ``identical_outputs`` (plus the settings).

Label scoring (``--label-n`` clause prompts, each with its counterfactual bias variants, for the base and
a tuned adapter: a random LoRA, r=8): the contender is ``evaluate.generation.score_labels`` on every
prompt of both subjects in one call, as evaluation calls it (``best_only``: only the labels needed to know
the best one are scored; each prompt's KV cache shared by its labels, batches mixing the two adapters
through gathered LoRA, on the decoder's forward); the baseline runs one forward per (subject, prompt, label) on the
full prompt + label + end-of-turn sequence. JSON: ``label_examples_per_s``,
``label_baseline_examples_per_s``, ``label_scoring_speedup``, ``identical_labels``. The exit status is 1
when the labels (or the generated outputs) are not identical to the baseline's.
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


def label_variants(n: int) -> tuple[list[list[dict]], list[str]]:
    """``n`` clause prompts and their bias-suite variants (two word-list categories), and the labels."""
    from finetrace.data.schemas import to_example
    from finetrace.evaluate import bias

    path = ROOT / "examples" / "clauses" / "test.csv"
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    labels = sorted({r["label"] for r in rows})
    cats = bias.load_wordlists()
    out = []
    for i, r in enumerate(rows[:n]):
        ex = to_example(r, "classification", labels)
        out.append(ex.messages)
        for name in list(cats)[:2]:
            v = bias.variants(ex, i, cats[name])
            if v:
                out += [e.messages for e in v[1].values()]
    return out, labels


def bench_labels(model, tok, n: int, batch_size: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from finetrace.decoding import BASE, encode_chat, turn_end_id
    from finetrace.decoding.labels import best_label
    from finetrace.decoding.lora import adapter_selector
    from finetrace.evaluate.generation import score_labels

    torch.manual_seed(0)
    peft = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "v_proj", "o_proj", "up_proj"],
        ),
        adapter_name="a0",
    )
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft.eval()
    ps, labels = label_variants(n)
    sel = adapter_selector(peft, "gathered", ["a0"])
    rows = ps + ps
    names = [BASE] * len(ps) + ["a0"] * len(ps)
    score_labels(peft, tok, ps[:1], labels, adapters=sel, adapter=BASE)  # warm-up
    t0 = time.perf_counter()
    fast, _ = score_labels(  # as evaluation calls it: only the labels needed to know the best one
        peft, tok, rows, labels, batch_size=batch_size, adapters=sel, adapter=names, best_only=True
    )
    t_fast = time.perf_counter() - t0
    end = turn_end_id(tok, model)
    conts = [tok(lab, add_special_tokens=False)["input_ids"] + [end] for lab in labels]
    slow = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p, name in zip(rows, names):
            sel.select([name])
            prompt = encode_chat(tok, p)
            scores = []
            for c in conts:
                lp = torch.log_softmax(peft(torch.tensor([prompt + c])).logits[0].float(), -1)
                scores.append(sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(c)))
            slow.append(best_label(labels, scores))
    t_slow = time.perf_counter() - t0
    diff = [i for i, (a, b) in enumerate(zip(fast, slow)) if a != b]
    print(f"label scoring: {len(rows)} prompts ({len(ps)} per subject incl. bias variants), {len(labels)} labels")
    print(f"  one (prompt, label) at a time: {t_slow:.1f} s ({len(rows) / t_slow:.2f} examples/s)")
    print(f"  batched, shared cache:          {t_fast:.1f} s ({len(rows) / t_fast:.2f} examples/s)")
    print(f"  identical labels: {not diff}" + (f" (differ at {diff[:10]})" if diff else ""))
    peft.unload()
    return {
        "label_examples_per_s": round(len(rows) / t_fast, 3),
        "label_baseline_examples_per_s": round(len(rows) / t_slow, 3),
        "label_scoring_speedup": round(t_slow / t_fast, 2),
        "identical_labels": not diff,
        "label_prompts": len(rows),
        "labels": len(labels),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="catalog name, or 'tiny'")
    ap.add_argument("--n", type=int, default=32, help="prompts")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument(
        "--label-n",
        type=int,
        default=2,
        help="clause prompts for label scoring (0: skip; the one-at-a-time side takes minutes each)",
    )
    ap.add_argument("--skip-generation", action="store_true", help="only the label-scoring comparison")
    args = ap.parse_args(argv)

    import torch
    from transformers import GenerationConfig

    from finetrace.cli.progress import Bars
    from finetrace.decoding import end_ids, render
    from finetrace.decoding.chat import pad_id
    from finetrace.evaluate.generation import generate

    with tempfile.TemporaryDirectory() as tmp:
        model, tok, art = load(args.model, Path(tmp) / "ws")
        extra = bench_labels(model, tok, args.label_n, args.batch_size) if args.label_n else {}
        if args.skip_generation:
            print(json.dumps({**extra, "model": args.model, "cpu_count": os.cpu_count()}))
            return 0 if extra.get("identical_labels", True) else 1
        ps = prompts(args.n)
        eos = sorted(end_ids(tok, model))
        cfg = GenerationConfig(
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            eos_token_id=eos,
            pad_token_id=pad_id(tok),
        )

        generate(model, tok, ps[:2], max_new_tokens=2, batch_size=2)  # warm-up (allocations, kernels)
        t0 = time.perf_counter()
        base_out, new_tokens = [], 0
        with torch.inference_mode():
            for p in ps:
                ids = tok(render(tok, p), return_tensors="pt", add_special_tokens=False)
                out = model.generate(**ids, generation_config=cfg)
                new = out[0, ids.input_ids.shape[1] :].tolist()
                new_tokens += len(new)
                cut = next((j for j, t in enumerate(new) if t in eos), len(new))
                base_out.append(tok.decode(new[:cut], skip_special_tokens=True).strip())
        t_base = time.perf_counter() - t0

        t0 = time.perf_counter()
        batched = generate(
            model,
            tok,
            ps,
            max_new_tokens=args.max_new_tokens,
            stop=(),
            batch_size=args.batch_size,
            progress=Bars(sys.stderr.isatty()) if sys.stderr.isatty() else None,
        )
        t_batch = time.perf_counter() - t0

    same = batched == base_out
    diff = [i for i, (a, b) in enumerate(zip(batched, base_out)) if a != b]
    print(
        f"model {art.ref} ({art.digest[:19]}), {len(ps)} prompts, max_new_tokens {args.max_new_tokens}, "
        f"batch {args.batch_size}, torch threads {torch.get_num_threads()}"
    )
    print(f"one at a time: {t_base:.1f} s ({len(ps) / t_base:.2f} examples/s, {new_tokens / t_base:.1f} new tokens/s)")
    print(f"batched:       {t_batch:.1f} s ({len(ps) / t_batch:.2f} examples/s)")
    print(f"identical outputs: {same}" + (f" (differ at {diff[:10]})" if diff else ""))
    print(
        json.dumps(
            {
                "examples_per_s": round(len(ps) / t_batch, 3),
                "baseline_examples_per_s": round(len(ps) / t_base, 3),
                "speedup": round(t_base / t_batch, 2),
                "identical_outputs": same,
                "model": args.model,
                "n": len(ps),
                "batch_size": args.batch_size,
                "max_new_tokens": args.max_new_tokens,
                "baseline_new_tokens": new_tokens,
                "cpu_count": os.cpu_count(),
                **extra,
            }
        )
    )
    return 0 if same and extra.get("identical_labels", True) else 1


if __name__ == "__main__":
    sys.exit(main())
