"""Run by test_plan.py in a fresh process: train each base once and print the plan's estimate beside the
peak resident memory measured for that run (VmHWM, reset before each run through /proc/self/clear_refs)."""

import gc
import json
import sys
from pathlib import Path


def vm(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def main(ws_dir: str, method: str, *bases: str) -> None:
    from finetrace.train import TrainConfig, train
    from finetrace.workspace import Workspace

    ws = Workspace.open(ws_dir)
    for base in bases:
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        cfg = TrainConfig(
            base_model=base,
            dataset="long",
            output_name=f"p-{base}-{method}",
            method=method,
            batch_size=8,
            max_steps=2,
            checkpoint_every=None,
            validation_split=None,
            seed=0,
        )
        art = train(ws, cfg, progress=False)
        m = ws.ledger.get_run(art.run_id).metrics
        print(
            json.dumps(
                {
                    "base": base,
                    "method": method,
                    "estimate": m["memory_plan"]["peak_mb"],
                    "measured": vm("VmHWM"),
                    "parts": m["memory_plan"]["parts_mb"],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
