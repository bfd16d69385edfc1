"""Benchmark: stream-import a generated JSONL file; compare with loading it via `datasets` and pandas.

    .venv/bin/python bench/data_import.py                 # ~1 GB file (default --size-mb 1024)
    .venv/bin/python bench/data_import.py --size-mb 50    # quick run

Generates a chat-free completion dataset (~1 KB rows with e-mails, phone numbers and some exact and
near duplicates, so every cleaning step does real work), then runs each contender in its own child
process and reads that child's peak RSS from ``resource.getrusage(RUSAGE_CHILDREN)``:

- finetrace  ``import_dataset`` (validate, NFC, PII redaction, exact + MinHash dedup, split, Parquet), in
             Arrow record batches, with worker processes for inputs over 64 MiB (``--workers`` to choose);
             the workers write the cleaned rows to scratch Arrow files, the main process writes the splits;
             MinHash by the numba loop when the ``fast`` extra is installed and the input is over
             96 MiB (``"minhash"`` in the JSON line says which ran)
- datasets   ``load_dataset("json", ...)`` (parse to Arrow only; no validation/cleaning), own cache dir
- pandas     ``read_json(lines=True)`` (parse into memory only)

Prints a table and ends with ONE JSON line with ``rows_per_s`` and ``peak_rss_mb`` (finetrace) and the
baselines' figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "contract supplier deliver goods invoice payment clause termination liability confidential "
    "customer order shipment warranty refund account billing technical support request issue "
    "resolve escalate policy data personal processing lawful transparent article governance"
).split()


def generate(path: Path, size_mb: int, seed: int = 0) -> int:
    """Write ~size_mb MiB of JSONL; return the number of rows."""
    rng = random.Random(seed)
    target = size_mb << 20
    n = written = 0
    recent: list[dict] = []
    with open(path, "w", encoding="utf-8") as fh:
        while written < target:
            r = rng.random()
            if recent and r < 0.01:  # exact duplicate
                row = rng.choice(recent)
            elif recent and r < 0.02:  # near duplicate: one word changed
                base = rng.choice(recent)
                words = base["prompt"].split()
                words[rng.randrange(len(words))] = "changed"
                row = {"prompt": " ".join(words), "completion": base["completion"]}
            else:
                prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 110)))
                if rng.random() < 0.05:
                    prompt += (
                        f" Contact jane{n}@example.com or +1 555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}."
                    )
                row = {
                    "prompt": f"Ticket {n}: {prompt}",
                    "completion": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 50))),
                    "id": n,
                }
                recent.append(row)
                if len(recent) > 1000:
                    recent.pop(0)
            line = json.dumps(row) + "\n"
            fh.write(line)
            written += len(line)
            n += 1
    return n


CHILD = {
    "finetrace": """
import sys, time, json
from finetrace.workspace import Workspace
from finetrace.data import import_dataset
ws = Workspace.init(sys.argv[2])
t = time.perf_counter()
art = import_dataset(ws, [sys.argv[1]], "bench", on_error="skip", workers=int(sys.argv[3]))
dt = time.perf_counter() - t
import os
from finetrace.data import pii, workers as W
pool = W.Pool(int(sys.argv[3]), os.path.getsize(sys.argv[1]), pii.detectors())  # what the import chose
print(json.dumps({"seconds": dt, "rows": art.metadata["rows_in"], "rows_out": art.metadata["rows_out"],
                  "ref": art.ref, "workers": pool.workers, "minhash": "numba" if pool.compiled else "numpy"}))
""",
    "datasets": """
import sys, time, json
from datasets import load_dataset
t = time.perf_counter()
ds = load_dataset("json", data_files=sys.argv[1], split="train", cache_dir=sys.argv[2])
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "rows": len(ds)}))
""",
    "pandas": """
import sys, time, json
import pandas as pd
t = time.perf_counter()
df = pd.read_json(sys.argv[1], lines=True)
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "rows": len(df)}))
""",
}


def run_child(name: str, data: Path, scratch: Path, workers: int = 0) -> dict:
    """Run one contender in a fresh process; its peak RSS comes from RUSAGE_CHILDREN of a wrapper."""
    wrapper = (
        "import resource, subprocess, sys, json\n"
        "p = subprocess.run([sys.executable, '-c', sys.argv[1], *sys.argv[2:]], capture_output=True, text=True)\n"
        "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(json.dumps({'rc': p.returncode, 'out': p.stdout, 'err': p.stderr[-2000:], 'maxrss_kb': ru.ru_maxrss,\n"
        "                  'cpu_s': ru.ru_utime + ru.ru_stime}))\n"
    )
    out_dir = scratch / name
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-c", wrapper, CHILD[name], str(data), str(out_dir), str(workers)],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{name} wrapper failed: {p.stderr[-2000:]}")
    res = json.loads(p.stdout)
    if res["rc"] != 0:
        return {"name": name, "failed": True, "error": res["err"][-500:], "peak_rss_mb": res["maxrss_kb"] / 1024}
    inner = json.loads(res["out"].strip().splitlines()[-1])
    return {
        "name": name,
        "seconds": round(inner["seconds"], 2),
        "wall_s": round(wall, 2),
        "rows": inner["rows"],
        "rows_per_s": round(inner["rows"] / inner["seconds"], 1),
        "peak_rss_mb": round(res["maxrss_kb"] / 1024, 1),
        # CPU seconds of the contender and its workers (imports included): steadier than wall time
        # when other processes share the CPUs
        "cpu_s": round(res["cpu_s"], 2),
        **{k: inner[k] for k in ("rows_out", "workers", "minhash") if k in inner},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024, help="size of the generated JSONL (MiB)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--workers", type=int, default=0, help="finetrace worker processes (0: automatic)")
    ap.add_argument(
        "--skip-baselines",
        nargs="*",
        default=[],
        choices=["datasets", "pandas"],
        help="baselines to leave out (pandas needs several times the file size in memory)",
    )
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="finetrace-bench-"))
    data = scratch / "bench.jsonl"
    t = time.perf_counter()
    rows = generate(data, args.size_mb)
    size_mb = data.stat().st_size / (1 << 20)
    print(f"generated {data} ({size_mb:.0f} MiB, {rows:,} rows) in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    results = {}
    load_before = os.getloadavg()[0]
    for name in ("finetrace", "datasets", "pandas"):
        if name in args.skip_baselines:
            continue
        results[name] = r = run_child(name, data, scratch, args.workers)
        print(
            f"{name:10s} {r.get('seconds', float('nan')):8.1f}s {r.get('rows_per_s', 0):>12,.0f} rows/s "
            f"peak RSS {r['peak_rss_mb']:8.0f} MiB" + (" FAILED" if r.get("failed") else ""),
            file=sys.stderr,
        )
    if not args.keep:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    ft = results["finetrace"]
    summary = {
        "bench": "data_import",
        "file_mb": round(size_mb, 1),
        "rows": rows,
        "workers": ft.get("workers", args.workers),
        "minhash": ft.get("minhash"),
        "rows_per_s": ft.get("rows_per_s"),
        "peak_rss_mb": ft["peak_rss_mb"],
        "seconds": ft.get("seconds"),
        "cpu_s": ft.get("cpu_s"),
        "rows_out": ft.get("rows_out"),
        "baselines": {
            k: {kk: v.get(kk) for kk in ("seconds", "cpu_s", "rows_per_s", "peak_rss_mb", "failed")}
            for k, v in results.items()
            if k != "finetrace"
        },
        "cpu_count": os.cpu_count(),
        # other processes share the CPUs: the 1-minute load average before and after, so a figure
        # measured on a busy machine says so (the ratio to `datasets` is the steadier number)
        "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    for v in summary["baselines"].values():
        if v.get("rows_per_s") and ft.get("rows_per_s"):
            v["finetrace_speed_ratio"] = round(ft["rows_per_s"] / v["rows_per_s"], 3)
            v["finetrace_memory_ratio"] = round(ft["peak_rss_mb"] / v["peak_rss_mb"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
