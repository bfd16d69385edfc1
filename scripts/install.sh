#!/usr/bin/env bash
# Install finetrace, its dev and tracking extras into ./.venv (idempotent; safe to run again).
# torch is installed first, pinned to the CPU build, so pip never resolves a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  "${PIP[@]}" install "torch==2.13.0"
fi
stamp=.venv/.finetrace-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  # tracking: MLflow/TensorBoard tests; quant: bitsandbytes, for method: qlora; structured: llguidance, for
  # response_format; fast: numba, the compiled MinHash loop of large data imports; llamacpp:
  # llama-cpp-python, built from source by pip the first time (~4-7 CPU-minutes; pip caches the wheel, so
  # later installs take seconds)
  extras="dev,tracking,quant,structured,fast"
  if [ "${FINETRACE_NO_LLAMACPP:-0}" != 1 ]; then
    if ! command -v c++ >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && [ "${FINETRACE_NO_APT:-0}" != 1 ]; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential >/dev/null) \
        || echo "warning: could not install a C++ compiler; llama-cpp-python may not build" >&2
    fi
    extras="$extras,llamacpp"
  fi
  "${PIP[@]}" install -c constraints.txt -e ".[$extras]"
  touch "$stamp"
fi
# A headless browser and PDF tools for the report/page screenshot tests (Debian's packages); best effort.
if [ "${FINETRACE_NO_APT:-0}" != 1 ] && [ "$(id -u)" = 0 ] \
   && { ! command -v chromium >/dev/null 2>&1 || ! command -v pdftoppm >/dev/null 2>&1; }; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium poppler-utils >/dev/null) \
    || echo "warning: could not install chromium/poppler-utils; browser tests will be skipped" >&2
fi
