#!/usr/bin/env bash
# Start a throwaway PostgreSQL cluster on a free 127.0.0.1 port and print its SQLAlchemy URL (last line of
# stdout). Used by .ci/run for the registry tests:
#
#   export FINETRACE_TEST_PG_URL=$(scripts/start_postgres.sh /tmp/ft-pg)
#   .venv/bin/pytest tests/market -q
#   scripts/start_postgres.sh --stop /tmp/ft-pg
#
# Installs the Debian `postgresql` package if no server binaries are present. PostgreSQL refuses to run as
# root, so as root the cluster runs as the `postgres` user (created by the package).
set -euo pipefail

if [[ "${1:-}" == "--stop" ]]; then
    DIR=${2:?usage: start_postgres.sh --stop DIR}
    BIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -1)")
    if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$BIN/pg_ctl" -D "$DIR/data" -m fast stop >&2
    else "$BIN/pg_ctl" -D "$DIR/data" -m fast stop >&2; fi
    exit 0
fi

DIR=${1:-$(mktemp -d /tmp/ft-pg.XXXXXX)}
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    (apt-get update && apt-get install -y --no-install-recommends postgresql) >&2
fi
BIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")
PORT=${PGPORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
mkdir -p "$DIR"
run() { if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if [[ $(id -u) == 0 ]]; then chown -R postgres "$DIR"; fi
if [[ ! -f "$DIR/data/PG_VERSION" ]]; then
    run "$BIN/initdb" -D "$DIR/data" -U postgres --auth=trust --no-sync >&2
fi
run "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c fsync=off" start >&2
echo "stop with: scripts/start_postgres.sh --stop $DIR" >&2
echo "postgresql+psycopg://postgres@127.0.0.1:$PORT/postgres"
