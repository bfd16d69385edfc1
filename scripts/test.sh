#!/usr/bin/env bash
# Install everything (idempotent) and run the test suite. Starts a throwaway PostgreSQL server for the
# registry tests (stopped again at exit) unless FINETRACE_TEST_PG_URL is already set or
# FINETRACE_NO_POSTGRES=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# Bytecode caches on, whatever the shell says: without them every worker recompiles (and pytest re-rewrites)
# each test module and finetrace module it imports, and so does every child process a test starts (about
# 6 s of each worker's collection on this machine). They go to the ignored __pycache__/ folders.
unset PYTHONDONTWRITEBYTECODE
if [ -z "${FINETRACE_TEST_PG_URL:-}" ] && [ "${FINETRACE_NO_POSTGRES:-0}" != 1 ]; then
  PGDIR=$(mktemp -d /tmp/finetrace-pg.XXXXXX)
  if url=$(bash scripts/start_postgres.sh "$PGDIR" | tail -n 1) && [ -n "$url" ]; then
    export FINETRACE_TEST_PG_URL=$url
    trap 'bash scripts/start_postgres.sh --stop "$PGDIR" >/dev/null 2>&1 || true; rm -rf "$PGDIR"' EXIT
  else
    echo "warning: PostgreSQL could not be started; its registry tests will be skipped" >&2
  fi
fi
# Two pytest-xdist workers, one torch thread each (tests/conftest.py sets OMP_NUM_THREADS=1): on 2 cores this
# keeps both busy while a test waits on a child process or a socket. Each test file stays on one worker
# (loadfile: module fixtures and tests that build on the one before are kept together).
# FINETRACE_TEST_WORKERS=0 runs in one process.
.venv/bin/python -m pytest -n "${FINETRACE_TEST_WORKERS:-2}" --dist loadfile "$@"
