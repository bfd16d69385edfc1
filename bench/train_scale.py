"""Training at billion-parameter scale: QLoRA (HF Trainer + PEFT + bitsandbytes) vs finetrace QLoRA vs
finetrace LoRA on the fp32 base, side by side, on a random-initialised model of Llama-3.2-1B's shape.

    .venv/bin/python bench/train_scale.py [--steps 4] [--batch 4] [--shape llama-3.2-1b] [--layers N] [--threads 2]

``--layers N`` keeps the shape's widths and vocabulary with N decoder layers (quick development runs).

The model (~1.24B parameters, bf16 sharded safetensors as on the Hub) is written once by
``finetrace.models.random_init`` (seeded; cached under ``--cache``) and added to a fresh workspace with
``models add`` (shard-aware). All three sides train LoRA r=16 (alpha 32) on every linear layer of the
decoder, AdamW lr 2e-4 constant, clip 1.0, the same examples in the same optimiser steps (finetrace's
seeded order):

  baseline_qlora   the usual stack (what Axolotl and LLaMA-Factory run): BitsAndBytesConfig NF4 + double
                   quant, compute fp32, peft ``prepare_model_for_kbit_training``, HF Trainer with padded
                   batches, labels -100 on prompt and padding, full logits
  baseline_qlora_bf16  the same stack asked for bf16: ``bnb_4bit_compute_dtype=bfloat16``, the model loaded
                   in bf16 and the Trainer's ``bf16=True`` (autocast); on CUDA this is what baseline_qlora is
                   already, so it is not run there. The faster of the two baselines is the one compared with
  qlora            finetrace ``method: qlora`` (the same NF4 base; packing, loss at target positions only,
                   fused LoRA on the 4-bit layers, compiled kernels) with gradient checkpointing, QLoRA's
                   usual recipe; compute dtype ``auto`` (bf16 on CUDA and on CPUs with AMX/AVX512-BF16,
                   else fp32, where the bf16-stored embedding and tied output layer stay bf16, widened
                   where used)
  lora_fp32        finetrace ``method: lora`` on the base at fp32, without gradient checkpointing
  qlora_no_checkpointing  (not run unless named in ``--sides``) finetrace QLoRA keeping every layer's
                   activations, in micro-batches of at most ``--no-checkpointing-micro-batch-tokens``
                   (the same update): no recomputation, activation memory bounded by the token budget

The baseline runs without gradient checkpointing (its faster setting), so the speed-up is measured against
the baseline's best speed, and the memory ratio against the fp32 run's default configuration.

Each side runs in its own subprocess so its peak RSS (ru_maxrss) is its own; tokens/s counts real
(non-pad) tokens over the summed optimiser-step times (loading excluded; finetrace's first-step kernel
compilation included). The finetrace sides also print the memory plan's estimate beside the measured peak.
finetrace's sides start their process as the ``finetrace`` command does (``finetrace.memory``: huge-page
tensors, large blocks mapped on their own); the baseline starts as a plain ``python`` does.
The last line is one JSON object with the figures.
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

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import WORDS  # noqa: E402

LORA_R, LORA_ALPHA, LR = 16, 32, 2e-4
BASE, DATA = "scale-base", "scale-instructions"


def make_rows(tok, n: int, seed: int, lo: int, hi: int) -> list[dict]:
    """Instruction rows whose chat-formatted length (prompt + answer + eos) is lo-hi tokens."""
    from finetrace.train.data import encode

    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        target_len = rng.randint(lo, hi)
        total_words = max(4, int(target_len / 1.6) - 8)
        split = max(1, int(total_words * rng.uniform(0.3, 0.7)))
        prompt = " ".join(rng.choice(WORDS) for _ in range(split))
        answer = " ".join(rng.choice(WORDS) for _ in range(max(1, total_words - split)))
        enc = encode(tok, [{"role": "user", "content": prompt}], answer)
        if lo <= len(enc.ids) <= hi:
            rows.append({"prompt": prompt, "completion": answer})
    return rows


# -- children ------------------------------------------------------------------------------------
def _finetrace(
    ws_dir: str,
    steps: int,
    batch: int,
    method: str,
    checkpointing: bool = False,
    name: str = "",
    mbt: int | None = None,
) -> dict:
    from finetrace.train import TrainConfig, train
    from finetrace.workspace import Workspace

    ws = Workspace.open(ws_dir)
    cfg = TrainConfig(
        base_model=BASE,
        dataset=DATA,
        method=method,
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
        device=os.environ.get("BENCH_DEVICE", "cpu"),
        output_name=f"scale-{method}{name}",
        gradient_checkpointing=checkpointing,
        micro_batch_tokens=mbt,
    )
    art = train(ws, cfg, progress=None)
    m = ws.ledger.get_run(art.run_id).metrics
    hist = [json.loads(line) for line in (ws.store.materialize(art.digest) / "metrics.jsonl").read_text().splitlines()]
    return {
        "tokens": m["tokens"],
        "step_time_s": m["wall_time_s"],
        "losses": [r["loss"] for r in hist if "loss" in r],
        "plan_peak_mb": (m.get("memory_plan") or {}).get("peak_mb"),
        **gpu_peak(),
    }


def gpu_peak() -> dict:
    import torch

    return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20} if torch.cuda.is_available() else {}


def child_qlora(ws_dir: str, steps: int, batch: int) -> dict:
    return _finetrace(ws_dir, steps, batch, "qlora", checkpointing=True)


def child_qlora_no_checkpointing(ws_dir: str, steps: int, batch: int) -> dict:
    mbt = int(os.environ.get("BENCH_NO_CKPT_MBT") or 0) or None
    return _finetrace(ws_dir, steps, batch, "qlora", checkpointing=False, name="-no-checkpointing", mbt=mbt)


def child_lora_fp32(ws_dir: str, steps: int, batch: int) -> dict:
    return _finetrace(ws_dir, steps, batch, "lora")


def child_baseline_qlora_bf16(ws_dir: str, steps: int, batch: int) -> dict:
    os.environ["BENCH_BASELINE_COMPUTE"] = "bfloat16"
    return child_baseline_qlora(ws_dir, steps, batch)


def child_baseline_qlora(ws_dir: str, steps: int, batch: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from finetrace.models import model_path
    from finetrace.train.adapters import linear_targets
    from finetrace.train.data import encode, plan, read_dataset
    from finetrace.workspace import Workspace

    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    ws = Workspace.open(ws_dir)
    path, _ = model_path(ws, BASE)
    _, rows = read_dataset(ws.store.materialize(ws.ledger.resolve(DATA).digest), "train")
    tok = AutoTokenizer.from_pretrained(path)
    cuda = os.environ.get("BENCH_DEVICE", "cpu") == "cuda"
    bf16 = cuda or os.environ.get("BENCH_BASELINE_COMPUTE") == "bfloat16"
    compute = torch.bfloat16 if bf16 else torch.float32
    q = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=q, device_map={"": 0} if cuda else "cpu", dtype=compute
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA_R,
            lora_alpha=LORA_ALPHA,
            lora_dropout=0.0,
            target_modules=linear_targets(model),
            task_type="CAUSAL_LM",
        ),
    )
    encoded = []
    for r in rows:
        enc = encode(tok, [{"role": "user", "content": r["prompt"]}], r["completion"])
        encoded.append({"input_ids": enc.ids, "labels": [-100] * enc.n_prompt + enc.ids[enc.n_prompt :]})
    order = plan([len(e["input_ids"]) for e in encoded], batch, 1, 1.0, steps, 0, False)
    data = [encoded[i] for step in order for i in step]
    seen: list[int] = []

    def collate(batch_rows):
        width = max(len(b["input_ids"]) for b in batch_rows)
        ids = torch.full((len(batch_rows), width), tok.pad_token_id)
        labels = torch.full((len(batch_rows), width), -100)
        mask = torch.zeros((len(batch_rows), width), dtype=torch.long)
        for i, b in enumerate(batch_rows):
            n = len(b["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        seen.append(sum(len(b["input_ids"]) for b in batch_rows))
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

    class InOrder(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

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
            use_cpu=not cuda,
            bf16=bf16,  # autocast, as a user asking for bf16 compute sets it
            fp16=False,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            seed=0,
        )
        InOrder(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[Timer()]).train()
    return {"tokens": sum(seen[: len(times)]), "step_time_s": sum(times), "losses": losses, **gpu_peak()}


OURS = ("qlora", "qlora_no_checkpointing", "lora_fp32")
# finetrace's sides start as `finetrace train` does: huge-page tensors requested before torch loads
AS_CLI = "from finetrace.memory import prefer_huge_pages; prefer_huge_pages();"


def run_child(kind: str, ws_dir: str, steps: int, batch: int, threads: int, device: str = "cpu") -> dict:
    """Run one side in a fresh interpreter; return its figures and its own peak RSS."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        result = fh.name
    code = (
        "import json, resource, sys; sys.path.insert(0, %r); %s import train_scale as b; "  # noqa: UP031  (a code string, %r quotes it)
        "r = b.child_%s(%r, %d, %d); r['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; "
        "json.dump(r, open(%r, 'w'))"
        % (str(Path(__file__).parent), AS_CLI if kind in OURS else "", kind, ws_dir, steps, batch, result)
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "BENCH_THREADS": str(threads),
        "BENCH_DEVICE": device,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    }
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{kind} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(Path(result).read_text())
    os.unlink(result)
    out["process_s"] = time.perf_counter() - t
    print(f"  {kind}: done in {out['process_s']:.0f} s", flush=True)
    return out


def setup(args) -> tuple[Path, int]:
    """A workspace holding the random model (added shard by shard) and the instruction set."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from finetrace.models import add_model, model_path
    from finetrace.models.random_init import SHAPES, write_random_model
    from finetrace.workspace import Workspace

    shape: str | dict = args.shape
    suffix = ""
    if args.layers is not None:  # a reduced-depth variant of the shape (same widths and vocabulary)
        shape = {**SHAPES[args.shape], "num_hidden_layers": args.layers}
        suffix = f"-{args.layers}layers"
    folder = Path(args.cache) / f"{args.shape}{suffix}-seed0-bf16"
    if not (folder / "model.safetensors.index.json").is_file():
        t = time.perf_counter()
        write_random_model(folder, shape, seed=0, dtype="bfloat16")
        print(f"wrote {folder} in {time.perf_counter() - t:.0f} s")
    tmp = Path(tempfile.mkdtemp(prefix="ft-bench-scale-", dir=args.workdir))
    atexit.register(shutil.rmtree, tmp, True)  # its workspace (the 1B model, stored, and the adapters) goes with it
    ws = Workspace.init(tmp / "ws")
    t = time.perf_counter()
    art = add_model(ws, folder, name=BASE)
    print(f"models add (sharded folder): {time.perf_counter() - t:.0f} s, {art.metadata['parameters']:,} parameters")
    tok = AutoTokenizer.from_pretrained(model_path(ws, BASE)[0])
    rows = make_rows(tok, args.examples, 0, args.min_len, args.max_len)
    ds = tmp / "dataset"
    ds.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), ds / "train.parquet")
    (ds / "dataset.json").write_text(
        json.dumps({"schema": "completion", "columns": ["prompt", "completion"], "counts": {"train": len(rows)}})
    )
    ws.ledger.add_artifact("dataset", ws.store.put_dir(ds), name=DATA)
    ws.close()
    return tmp / "ws", art.metadata["parameters"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument(
        "--layers", type=int, default=None, help="decoder layers (default: the shape's own; fewer for quick runs)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads on every side (default: physical cores)")
    ap.add_argument(
        "--cache", default=os.path.expanduser("~/.cache/finetrace/bench"), help="where the random model is written once"
    )
    ap.add_argument(
        "--workdir", default=None, help="where the scratch workspace goes, removed at exit (default: the temp folder)"
    )
    ap.add_argument(
        "--sides",
        default=None,
        help="default: baseline_qlora,baseline_qlora_bf16,qlora,lora_fp32 (no bf16 baseline on CUDA, where "
        "baseline_qlora already computes in bf16)",
    )
    ap.add_argument(
        "--no-checkpointing-micro-batch-tokens",
        type=int,
        default=None,
        help="qlora_no_checkpointing: split each step into micro-batches of at most this many tokens "
        "(same update, less activation memory)",
    )
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (every side on the GPU; QLoRA computes in bf16)")
    args = ap.parse_args()

    from finetrace.train.report import physical_cores

    threads = args.threads or physical_cores()
    os.environ["BENCH_NO_CKPT_MBT"] = str(args.no_checkpointing_micro_batch_tokens or "")
    ws_dir, params = setup(args)
    print(
        f"model: {args.shape} random init, {params / 1e9:.2f}B parameters; {args.steps} steps of batch {args.batch} "
        f"({args.min_len}-{args.max_len} tokens); LoRA r={LORA_R} all linear; {threads} threads"
    )
    res = {}
    sides = (
        args.sides or "baseline_qlora," + ("" if args.device == "cuda" else "baseline_qlora_bf16,") + "qlora,lora_fp32"
    )
    for kind in sides.split(","):
        res[kind] = r = run_child(kind, str(ws_dir), args.steps, args.batch, threads, args.device)
        r["tps"] = r["tokens"] / r["step_time_s"]
        plan = f"  plan {r['plan_peak_mb']:7.0f} MB" if r.get("plan_peak_mb") else ""
        print(
            f"{kind:>15}: {r['tps']:7.1f} real tokens/s  {r['step_time_s']:.0f} s in steps  peak RSS "
            f"{r['peak_rss_mb']:7.0f} MB{plan}  losses {[round(x, 3) for x in r['losses']]}",
            flush=True,
        )
    print(json.dumps(summary(res, args, params, threads)))


def summary(res: dict, args, params: int, threads: int) -> dict:
    """The JSON line: each side's figures, and finetrace QLoRA against the faster baseline."""
    q, f = res.get("qlora"), res.get("lora_fp32")
    baselines = {k: res[k] for k in ("baseline_qlora", "baseline_qlora_bf16") if k in res}
    fastest = max(baselines, key=lambda k: baselines[k]["tps"]) if baselines else None
    b = baselines.get(fastest)
    out = {
        "params": params,
        "shape": args.shape,
        "layers": args.layers,
        "steps": args.steps,
        "batch": args.batch,
        "threads": threads,
        "device": args.device,
        **{f"{k}_peak_gpu_mb": round(v["peak_gpu_mb"], 1) for k, v in res.items() if "peak_gpu_mb" in v},
    }
    if q:
        out.update(
            qlora_tokens_per_s=round(q["tps"], 2),
            qlora_peak_rss_mb=round(q["peak_rss_mb"], 1),
            qlora_plan_peak_mb=q.get("plan_peak_mb"),
            qlora_final_loss=round(q["losses"][-1], 4),
        )
    if b:
        out.update(
            baseline_qlora_compute="bfloat16" if fastest.endswith("bf16") or args.device == "cuda" else "float32",
            baseline_qlora_tokens_per_s=round(b["tps"], 2),
            baseline_qlora_peak_rss_mb=round(b["peak_rss_mb"], 1),
            baseline_final_loss=round(b["losses"][-1], 4),
            **{f"{k}_each_tokens_per_s": round(v["tps"], 2) for k, v in baselines.items()},
            **{f"{k}_each_peak_rss_mb": round(v["peak_rss_mb"], 1) for k, v in baselines.items()},
        )
    if f:
        out.update(
            lora_fp32_tokens_per_s=round(f["tps"], 2),
            lora_fp32_peak_rss_mb=round(f["peak_rss_mb"], 1),
            lora_fp32_plan_peak_mb=f.get("plan_peak_mb"),
        )
    if q and b:
        out.update(
            qlora_speedup=round(q["tps"] / b["tps"], 3),
            qlora_memory_ratio_vs_baseline=round(q["peak_rss_mb"] / b["peak_rss_mb"], 3),
            max_step_loss_difference=round(max(abs(x - y) for x, y in zip(q["losses"], b["losses"])), 4),
        )
        print(
            f"finetrace QLoRA vs HF QLoRA ({fastest}, the faster baseline): {out['qlora_speedup']:.2f}x tokens/s (target >= 1.5x), memory "
            f"{out['qlora_memory_ratio_vs_baseline']:.2f}x (target <= 1)"
        )
    nc = res.get("qlora_no_checkpointing")
    if nc:
        out.update(
            qlora_no_checkpointing_tokens_per_s=round(nc["tps"], 2),
            qlora_no_checkpointing_peak_rss_mb=round(nc["peak_rss_mb"], 1),
            qlora_no_checkpointing_plan_peak_mb=nc.get("plan_peak_mb"),
            qlora_no_checkpointing_micro_batch_tokens=args.no_checkpointing_micro_batch_tokens,
        )
        if b:
            out["qlora_no_checkpointing_speedup"] = round(nc["tps"] / b["tps"], 3)
            print(
                f"finetrace QLoRA without checkpointing vs HF QLoRA: {out['qlora_no_checkpointing_speedup']:.2f}x "
                f"tokens/s at {nc['peak_rss_mb'] / b['peak_rss_mb']:.2f}x its memory"
            )
        if f:
            out["qlora_no_checkpointing_memory_ratio_vs_fp32"] = round(nc["peak_rss_mb"] / f["peak_rss_mb"], 3)
    if q and f:
        out["qlora_memory_ratio_vs_fp32"] = round(q["peak_rss_mb"] / f["peak_rss_mb"], 3)
        print(f"finetrace QLoRA vs fp32 LoRA memory: {out['qlora_memory_ratio_vs_fp32']:.2f}x (target <= 0.35x)")
    return out


if __name__ == "__main__":
    main()
