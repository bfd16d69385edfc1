#!/usr/bin/env bash
# Install everything (idempotent), then run the whole pipeline offline on the bundled `clauses` task with
# SmolLM2-135M-Instruct: import, train (LoRA, a few minutes on 2 CPU cores), evaluate base vs tuned with
# bias checks and gates, generate the documents, approve, serve and ask one question through the openai
# client (answer + provenance id, resolved), stop the server; then verify the workspace and print the
# base and tuned scores and the path of the HTML report. Everything lands in ./quickstart-workspace.
# Run it again: every stage is cached (nothing re-runs unless a file changed).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/install.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
WS=${FINETRACE_WORKSPACE:-$PWD/quickstart-workspace}
PIPELINE=${PIPELINE:-examples/clauses/pipeline.yaml}
ft() { .venv/bin/finetrace -w "$WS" "$@"; }
echo "== installed in $(( $(date +%s) - start ))s; workspace: $WS"
ft init
# progress and the summary table go to the terminal (stderr); the result as JSON to a file
ft run "$PIPELINE" --json > "$WS/quickstart-result.json"
echo "== verify: recompute every ledger entry, root, checkpoint and object digest"
ft verify
.venv/bin/python - "$WS/quickstart-result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
ev = next(s for s in r["stages"] if s["stage"] == "evaluate")["metrics"]
dep = (r["state"].get("deploy") or {})
print("\n== quickstart result")
for k in sorted(ev):
    if k.startswith(("base_", "tuned_")):
        print(f"{k:<22} {ev[k]:.3f}")
print(f"{'gates':<22} {ev.get('gates')}")
if dep.get("answer") is not None:
    print(f"{'answer':<22} {dep['answer']!r}  (provenance id {dep['provenance_id']})")
for k in ("eval_report", "model_card", "documents"):
    if k in r["paths"]:
        print(f"{k:<22} {r['paths'][k]}")
PY
echo "quickstart finished in $(( $(date +%s) - start ))s (installation included)"
