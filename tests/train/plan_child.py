"""Run by test_plan.py in a fresh process: train each base once per method and print the plan's estimate
beside the peak resident memory measured for that run (VmHWM, reset before each run through
/proc/self/clear_refs).

The process imports torch, transformers and peft once, then forks one child per run, so every run starts
from the same state as a fresh process that has just imported them (nothing a previous run left in the
allocator is counted), and the imports are paid once for all the runs instead of once per method.

    python plan_child.py WORKSPACE METHOD[,METHOD...] BASE...
"""

import gc
import json
import os
import sys
from pathlib import Path


def vm(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def measure(ws_dir: str, method: str, base: str) -> None:
    from finetrace.train import TrainConfig, train
    from finetrace.workspace import Workspace

    ws = Workspace.open(ws_dir)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    cfg = TrainConfig(
        base_model=base,
        dataset="long",
        output_name=f"p-{base}-{method}",
        method=method,
        batch_size=4,
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


def main(ws_dir: str, methods: str, *bases: str) -> None:
    # what every run imports anyway (importing starts no threads, so forking afterwards is safe): the
    # training stack, bitsandbytes (qlora) and the compiler the fused kernels go through
    import peft  # noqa: F401
    import torch._dynamo  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    import finetrace.train  # noqa: F401
    import finetrace.workspace  # noqa: F401

    if "qlora" in methods.split(","):
        import bitsandbytes  # noqa: F401

    for method in methods.split(","):
        for base in bases:
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    measure(ws_dir, method, base)
                except BaseException as exc:  # noqa: BLE001 - report, never return into the loop
                    import traceback

                    traceback.print_exc()
                    sys.stderr.write(f"run {method} {base} failed: {exc!r}\n")
                    code = 1
                sys.stdout.flush()
                os._exit(code)
            _, status = os.waitpid(pid, 0)
            if status:
                sys.exit(f"the run of {method} on {base} ended with status {status}")
    sys.stdout.flush()
    os._exit(0)  # every run printed; skip the interpreter's teardown (~3 s with torch loaded)


if __name__ == "__main__":
    main(*sys.argv[1:])
