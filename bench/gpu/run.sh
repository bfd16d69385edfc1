#!/usr/bin/env bash
# One device session (a lent GPU machine; see docs/benchmarks.md): finetrace's trainer on CUDA.
#   1. the train tests with device: auto -> CUDA (the CPU suite, now on a GPU);
#   2. bench/train_throughput.py on the GPU (bf16, SmolLM2-135M shape, random weights: no download),
#      twice: the first run compiles the Triton kernels (cold cache), the second reuses them.
# Needs: .whl/ (wheels of what the machine lacks) and .gpu/smollm2 (SmolLM2's config + tokenizer), both carried.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
timeout "${TEST_S:-170}" python3 -m pytest tests/train -q -p no:cacheprovider -o addopts="" -W ignore 2>&1 \
  | tee "$OUT/tests.txt" | grep -E "passed|failed|FAILED|Error" | tail -15
for run in cold warm; do
  echo "== bench ($run Inductor cache)"
  timeout "${BENCH_S:-150}" python3 bench/train_throughput.py --device cuda --dtype bfloat16 --random-init .gpu/smollm2 \
    --steps "${STEPS:-40}" --batch 16 --examples 800 --plot "$OUT/gpu_loss_$run.png" 2>&1 \
    | grep -v -i warn | tee "$OUT/bench_$run.txt" | tail -7
done
# 3. QLoRA on CUDA against the usual stack (HF Trainer + PEFT + bitsandbytes), Llama-3.2-1B shape (random
#    weights written by finetrace.models.random_init); SHAPE=... for a larger shape that fits the lease.
echo "== bench/train_scale.py on CUDA"
timeout "${SCALE_S:-240}" python3 bench/train_scale.py --device cuda --shape "${SHAPE:-llama-3.2-1b}" \
  --steps "${SCALE_STEPS:-10}" --batch 8 --cache /tmp/scale-cache 2>&1 | grep -v -i warn | tee "$OUT/scale.txt" | tail -8
