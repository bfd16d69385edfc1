#!/usr/bin/env bash
# Where does time go on the GPU machine? Streams the bench children's output and dumps their stacks every 40 s.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 BENCH_VERBOSE=1
nproc; python3 -c "import os; print('affinity', len(os.sched_getaffinity(0)))"
timeout "${BENCH_S:-200}" python3 bench/train_throughput.py --device cuda --dtype bfloat16 --random-init .gpu/smollm2 \
  --steps "${STEPS:-8}" --batch 16 --examples 200 2>&1 | grep -v -iE "warn|it/s\]$" | cut -c1-300 | tee "$OUT/diag.txt" | tail -120
