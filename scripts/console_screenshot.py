"""Make the README's screenshot of the console (``docs/img/console.png``) with headless Chromium.

    python scripts/console_screenshot.py                          # a demo workspace, built here (~1 min)
    python scripts/console_screenshot.py --workspace quickstart-workspace   # a real one, e.g. the quickstart's

Without ``--workspace`` it runs the bundled ``clauses`` pipeline on a tiny random model (so it needs no
download and takes about a minute on 2 cores; the numbers are a random model's, the pages are real),
then serves ``finetrace ui`` on a free loopback port and screenshots the runs page (and the lineage
graph of the adapter, ``docs/img/console_lineage.png``). Needs Chromium (``apt-get install -y chromium``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MAX_PNG_BYTES = 300_000


def demo_workspace(tmp: Path) -> Path:
    """The clauses pipeline on a tiny model: import, train (with validation loss), evaluate, docs, serve."""
    from finetrace.models.tiny import build_tiny_model
    from finetrace.pipeline import run_pipeline
    from finetrace.workspace import Workspace

    task = tmp / "clauses"
    shutil.copytree(ROOT / "examples" / "clauses", task)
    suite = yaml.safe_load((task / "suite.yaml").read_text())
    suite.update(
        bootstrap={"samples": 200, "seed": 0},
        limit=60,
        bias={"enabled": True, "categories": ["gender_names"], "max_examples": 8},
        gates={"min_metric": {"accuracy": 0.0}, "max_flip_rate": 1.0},
    )  # a random model's numbers
    (task / "suite.yaml").write_text(yaml.safe_dump(suite))
    pipe = yaml.safe_load((task / "pipeline.yaml").read_text())
    pipe["model"] = {"source": str(build_tiny_model(tmp / "tiny-model")), "name": "tiny-demo"}
    pipe["train"] = {
        "config": "train.yaml",
        "max_steps": 12,
        "eval_every": 3,
        "compile": False,
        "checkpoint_every": None,
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    }
    pipe["deploy"]["max_tokens"] = 4
    (task / "pipeline.yaml").write_text(yaml.safe_dump(pipe, sort_keys=False))
    ws = Workspace.init(tmp / "ws")
    run_pipeline(ws, task / "pipeline.yaml", progress=None, echo=print)
    ws.close()
    return tmp / "ws"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", help="an existing workspace (default: build a demo one)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img" / "console.png"))
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=820)
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from finetrace.web import create_app
    from finetrace.web.snapshot import dump_dom, screenshot, serve_in_thread
    from finetrace.workspace import Workspace

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workspace).resolve() if args.workspace else demo_workspace(Path(tmp))
        with Workspace.open(root) as ws:
            adapters = ws.ledger.artifacts("adapter")
        out = Path(args.out)
        with serve_in_thread(create_app(root)) as url:
            if "run-row" not in dump_dom(url + "/"):
                print("error: the runs page shows no runs", file=sys.stderr)
                return 1
            shots = [screenshot(url + "/", out, args.width, args.height)]
            if adapters:
                shots.append(
                    screenshot(
                        f"{url}/lineage?ref={adapters[-1].digest}", out.with_name(out.stem + "_lineage.png"), 2100, 420
                    )
                )
    for png in shots:
        size = png.stat().st_size
        print(f"{png} {size / 1000:.0f} KB")
        if size > MAX_PNG_BYTES:
            print(f"warning: {png} is over {MAX_PNG_BYTES // 1000} KB; do not commit it", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
