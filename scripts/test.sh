#!/usr/bin/env bash
# Install everything (idempotent) and run the test suite. Starts a throwaway PostgreSQL server for the
# registry tests (stopped again at exit) unless FINETRACE_TEST_PG_URL is already set or
# FINETRACE_NO_POSTGRES=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if [ -z "${FINETRACE_TEST_PG_URL:-}" ] && [ "${FINETRACE_NO_POSTGRES:-0}" != 1 ]; then
  PGDIR=$(mktemp -d /tmp/finetrace-pg.XXXXXX)
  if url=$(bash scripts/start_postgres.sh "$PGDIR" | tail -n 1) && [ -n "$url" ]; then
    export FINETRACE_TEST_PG_URL=$url
    trap 'bash scripts/start_postgres.sh --stop "$PGDIR" >/dev/null 2>&1 || true; rm -rf "$PGDIR"' EXIT
  else
    echo "warning: PostgreSQL could not be started; its registry tests will be skipped" >&2
  fi
fi
.venv/bin/python -m pytest "$@"
