"""Training throughput: finetrace vs Hugging Face Trainer + PEFT, on SmolLM2-135M, side by side.

    .venv/bin/python bench/train_throughput.py [--steps 5] [--batch 8]

Both train LoRA r=16 (alpha 32) on every linear layer of the decoder, fp32, AdamW (lr 2e-4, constant,
clip 1.0), the same batch size and number of steps, on a generated instruction set whose examples are
20-400 tokens long (prompt + answer + end-of-turn). The baseline is what users run otherwise (Axolotl
and LLaMA-Factory wrap it): a padded batch with an attention mask, labels -100 on prompt and padding
(masked by segment, so the eos stop token keeps its loss), full logits, standard cross-entropy.

Both sides see the same examples in the same optimiser steps (finetrace's seeded order), so their loss
curves match step by step up to float rounding. Each side runs in its own subprocess so that peak RSS
(ru_maxrss) is its own. Tokens/s counts real (non-pad) tokens over the summed optimiser-step times
(model loading excluded on both sides; finetrace's kernel compilation, which happens in its first
step, included; Inductor caches it on disk, so only a machine's first run pays it in full). MFU is
the estimated useful FLOPs (``finetrace.train.report.step_flops``: real tokens only) over a measured
fp32 matmul ceiling. The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the contract supplier customer shall deliver goods within thirty days invoice payment data "
    "personal processed lawfully fairly transparent article governance question answer capital "
    "routing billing technical account shipping clause termination liability confidentiality model "
    "adapter dataset train evaluate serve audit report risk system user request policy service level "
    "agreement notice period party obligation warranty refund order delivery address support ticket "
    "password reset login error network latency server update version release schedule meeting"
).split()
LORA_R, LORA_ALPHA, LR = 16, 32, 2e-4


def make_rows(tok, n: int, seed: int) -> list[dict]:
    """Instruction rows whose chat-formatted length (prompt + answer + eos) is 20-400 tokens."""
    from finetrace.train.data import encode

    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        target_len = rng.randint(20, 400)
        total_words = max(4, int(target_len / 1.3) - 8)
        split = max(1, int(total_words * rng.uniform(0.3, 0.7)))
        prompt = " ".join(rng.choice(WORDS) for _ in range(split))
        answer = " ".join(rng.choice(WORDS) for _ in range(max(1, total_words - split)))
        enc = encode(tok, [{"role": "user", "content": prompt}], answer)
        if 20 <= len(enc.ids) <= 400:
            rows.append({"prompt": prompt, "completion": answer})
    return rows


def matmul_ceiling(threads: int, device: str = "cpu", dtype: str = "float32") -> float:
    """FLOP/s of a large square matmul (fp32 on ``threads`` CPU threads, or on the GPU), best of a few."""
    import torch

    torch.set_num_threads(threads)
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    a @ b
    best = 0.0
    for _ in range(5):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


# -- children ------------------------------------------------------------------------------------
def child_finetrace_gc(ws_dir: str, steps: int, batch: int) -> dict:
    return child_finetrace(ws_dir, steps, batch, gradient_checkpointing=True)


def child_finetrace(ws_dir: str, steps: int, batch: int, gradient_checkpointing: bool = False) -> dict:
    from finetrace.train import TrainConfig, train
    from finetrace.workspace import Workspace

    ws = Workspace.open(ws_dir)
    cfg = TrainConfig(
        base_model="smollm2-135m-instruct",
        dataset="bench-instructions",
        method="lora",
        lora={"r": LORA_R, "alpha": LORA_ALPHA},
        lr=LR,
        schedule="constant",
        batch_size=batch,
        max_steps=steps,
        max_length=512,
        checkpoint_every=None,
        validation_split=None,
        seed=0,
        threads=int(os.environ["BENCH_THREADS"]),
        gradient_checkpointing=gradient_checkpointing,
        device=os.environ["BENCH_DEVICE"],
        dtype=os.environ["BENCH_DTYPE"],
        micro_batch_tokens=None if os.environ["BENCH_DEVICE"] == "cuda" else 1024,
        output_name="bench-lora-gc" if gradient_checkpointing else "bench-lora",
    )
    art = train(ws, cfg, progress=None)
    m = ws.ledger.get_run(art.run_id).metrics
    hist = [json.loads(line) for line in (ws.store.materialize(art.digest) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in hist if "loss" in r]
    return {
        "tokens": m["tokens"],
        "step_time_s": m["wall_time_s"],
        "losses": losses,
        "flops": m["flops_estimate"],
        **gpu_memory(),
    }


def gpu_memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}


def child_baseline(ws_dir: str, steps: int, batch: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from finetrace.models import model_path
    from finetrace.train.adapters import linear_targets
    from finetrace.train.data import encode, plan, read_dataset
    from finetrace.train.report import model_counts, step_flops
    from finetrace.workspace import Workspace

    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    ws = Workspace.open(ws_dir)
    path, _ = model_path(ws, "smollm2-135m-instruct")
    ds_dir = ws.store.materialize(ws.ledger.resolve("bench-instructions").digest)
    _, rows = read_dataset(ds_dir, "train")
    tok = AutoTokenizer.from_pretrained(path)
    device, bf16 = os.environ["BENCH_DEVICE"], os.environ["BENCH_DTYPE"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16 if bf16 else torch.float32, use_safetensors=True
    ).to(device)
    targets = linear_targets(model)
    torch.manual_seed(0)
    model = get_peft_model(
        model,
        LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM"),
    )
    encoded = []
    for r in rows:
        enc = encode(tok, [{"role": "user", "content": r["prompt"]}], r["completion"])
        encoded.append({"input_ids": enc.ids, "labels": [-100] * enc.n_prompt + enc.ids[enc.n_prompt :]})
    # The same examples in the same steps as finetrace (its seeded data order), read in order, so the
    # two loss curves are comparable step by step.
    order = plan([len(e["input_ids"]) for e in encoded], batch, 1, 1.0, steps, 0, False)
    data = [encoded[i] for step in order for i in step]

    seen: list[tuple[int, int]] = []  # (real tokens, lengths) per batch, in order

    def collate(batch_rows):
        width = max(len(b["input_ids"]) for b in batch_rows)
        ids = torch.full((len(batch_rows), width), tok.pad_token_id)
        labels = torch.full((len(batch_rows), width), -100)
        mask = torch.zeros((len(batch_rows), width), dtype=torch.long)
        for i, b in enumerate(batch_rows):
            n = len(b["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        seen.append(
            (
                [len(b["input_ids"]) for b in batch_rows],
                sum(sum(1 for x in b["labels"] if x != -100) for b in batch_rows),
            )
        )
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    times: list[float] = []
    losses: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=batch,
            max_steps=steps,
            learning_rate=LR,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            optim="adamw_torch",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=device == "cpu",
            bf16=bf16,
            fp16=False,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            seed=0,
        )

        class InOrder(Trainer):
            def _get_train_sampler(self, train_dataset=None):
                return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

        InOrder(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[Timer()]).train()
    counts = model_counts(model)
    steps_seen = seen[: len(times)]
    return {
        "tokens": sum(sum(lens) for lens, _ in steps_seen),
        "step_time_s": sum(times),
        "losses": losses,
        "flops": sum(step_flops(counts, lens, nt) for lens, nt in steps_seen),
        **gpu_memory(),
    }


def run_child(
    kind: str, ws_dir: str, steps: int, batch: int, threads: int, device: str = "cpu", dtype: str = "float32"
) -> dict:
    """Run one side in a fresh interpreter; return its figures and its own peak RSS."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        result = fh.name
    code = (
        "import json, resource, sys; sys.path.insert(0, %r); import train_throughput as b; "  # noqa: UP031  (a code string, %r quotes it)
        "r = b.child_%s(%r, %d, %d); r['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; "
        "json.dump(r, open(%r, 'w'))" % (str(Path(__file__).parent), kind, ws_dir, steps, batch, result)
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "BENCH_THREADS": str(threads),
        "BENCH_DEVICE": device,
        "BENCH_DTYPE": dtype,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    }
    t = time.perf_counter()
    if os.environ.get("BENCH_VERBOSE"):  # stream the child's output; dump its stacks every 40 s
        code = "import faulthandler; faulthandler.dump_traceback_later(40, repeat=True); " + code
        proc = subprocess.run([sys.executable, "-c", code], env=env, text=True)
    else:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{kind} failed:\n{(proc.stderr or '(output above)')[-4000:]}")
    out = json.loads(Path(result).read_text())
    os.unlink(result)
    out["process_s"] = time.perf_counter() - t
    return out


def random_model(template: Path, out: Path) -> Path:
    """A model folder with ``template``'s config and tokenizer and seeded random weights (safetensors)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(template), dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    for f in template.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja" or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    return out


def plot_curves(path: Path, baseline: list[float], ours: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    ax.plot(range(1, len(baseline) + 1), baseline, "o-", label="HF Trainer + PEFT", linewidth=1, markersize=4)
    ax.plot(range(1, len(ours) + 1), ours, "x--", label="finetrace", linewidth=1, markersize=6)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_title("SmolLM2-135M, LoRA r=16 all linear, same data order", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--examples", type=int, default=400)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads on both sides (default: "
        "physical cores; use 1 on a machine shared with other jobs, where 2 threads thrash)",
    )
    ap.add_argument("--gc", action="store_true", help="also run finetrace with gradient checkpointing")
    ap.add_argument("--plot", type=Path, default=None, help="write the two loss curves to this PNG")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (both sides on the GPU)")
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="base model dtype on both sides (bfloat16: HF Trainer runs with bf16=True)",
    )
    ap.add_argument(
        "--random-init",
        type=Path,
        default=None,
        metavar="HF_FOLDER",
        help="no download: a randomly initialised model with the config and tokenizer of this "
        "folder (throughput does not depend on the weights' values)",
    )
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from finetrace.models import add_folder, add_model, model_path
    from finetrace.train.report import physical_cores
    from finetrace.workspace import Workspace

    threads = args.threads or physical_cores()
    tmp = Path(tempfile.mkdtemp(prefix="ft-bench-train-"))
    atexit.register(shutil.rmtree, tmp, True)  # its workspace (the base model and the adapters) goes with it
    ws = Workspace.init(tmp / "ws")
    if args.random_init:
        add_folder(ws, random_model(args.random_init, tmp / "random-model"), "smollm2-135m-instruct")
    else:
        add_model(ws, "smollm2-135m-instruct")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path(ws, "smollm2-135m-instruct")[0])
    rows = make_rows(tok, args.examples, seed=0)
    ds = tmp / "dataset"
    ds.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), ds / "train.parquet")
    (ds / "dataset.json").write_text(
        json.dumps({"schema": "completion", "columns": ["prompt", "completion"], "counts": {"train": len(rows)}})
    )
    ws.ledger.add_artifact("dataset", ws.store.put_dir(ds), name="bench-instructions")
    ws.close()

    ceiling = matmul_ceiling(threads, args.device, args.dtype)
    where = f"{threads} threads" if args.device == "cpu" else args.device
    print(f"machine: {where}, {args.dtype} matmul ceiling {ceiling / 1e9:.1f} GFLOP/s")
    print(
        f"data: {len(rows)} examples of 20-400 tokens; {args.steps} steps of batch {args.batch}; LoRA r={LORA_R} "
        f"all linear layers, AdamW lr {LR}"
    )
    base = run_child("baseline", str(ws.root), args.steps, args.batch, threads, args.device, args.dtype)
    ours = run_child("finetrace", str(ws.root), args.steps, args.batch, threads, args.device, args.dtype)
    sides = [("baseline", base), ("finetrace", ours)]
    if args.gc:
        sides.append(("finetrace+gc", run_child("finetrace_gc", str(ws.root), args.steps, args.batch, threads)))
    res = {}
    for name, r in sides:
        tps = r["tokens"] / r["step_time_s"]
        mfu = r["flops"] / r["step_time_s"] / ceiling
        gpu = f"  peak GPU {r['peak_gpu_mb']:7.0f} MB" if "peak_gpu_mb" in r else ""
        print(
            f"{name:>12}: {tps:8.1f} real tokens/s  {r['step_time_s']:.1f} s in steps  peak RSS "
            f"{r['peak_rss_mb']:7.0f} MB{gpu}  MFU {mfu:.1%}  losses {[round(x, 3) for x in r['losses']]}"
        )
        res[name] = (tps, mfu)
    loss_gap = max(abs(a - b) for a, b in zip(base["losses"], ours["losses"]))
    print(f"loss curves: the same examples in the same steps; largest step-loss difference {loss_gap:.2e}")
    if args.plot:
        plot_curves(args.plot, base["losses"], ours["losses"])
        print(f"loss curves written to {args.plot}")
    speedup = res["finetrace"][0] / res["baseline"][0]
    mem = ours["peak_rss_mb"] / base["peak_rss_mb"]
    print(f"speedup {speedup:.2f}x tokens/s (target >= 2x); memory {mem:.2f}x (target <= 0.7x)")
    print(
        json.dumps(
            {
                "baseline_tokens_per_s": round(res["baseline"][0], 2),
                "tokens_per_s": round(res["finetrace"][0], 2),
                "speedup": round(speedup, 3),
                "baseline_peak_rss_mb": round(base["peak_rss_mb"], 1),
                "peak_rss_mb": round(ours["peak_rss_mb"], 1),
                "memory_ratio": round(mem, 3),
                "mfu": round(res["finetrace"][1], 4),
                "baseline_mfu": round(res["baseline"][1], 4),
                "matmul_ceiling_gflops": round(ceiling / 1e9, 1),
                "baseline_final_loss": round(base["losses"][-1], 4),
                "final_loss": round(ours["losses"][-1], 4),
                "max_step_loss_difference": round(loss_gap, 6),
                "steps": args.steps,
                "batch": args.batch,
                "threads": threads,
                "device": args.device,
                "dtype": args.dtype,
                **(
                    {
                        "baseline_peak_gpu_mb": round(base["peak_gpu_mb"], 1),
                        "peak_gpu_mb": round(ours["peak_gpu_mb"], 1),
                        "gpu_memory_ratio": round(ours["peak_gpu_mb"] / base["peak_gpu_mb"], 3),
                    }
                    if "peak_gpu_mb" in ours
                    else {}
                ),
                **(
                    {
                        "gc_tokens_per_s": round(res["finetrace+gc"][0], 2),
                        "gc_peak_rss_mb": round(sides[2][1]["peak_rss_mb"], 1),
                    }
                    if args.gc
                    else {}
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
