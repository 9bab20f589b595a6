#!/usr/bin/env bash
# Stops what deploy/up.sh started (SIGTERM: the gateway drains, the worker finishes its batch).
set -uo pipefail
cd "$(dirname "$0")/.."
# Gateways first (they stop taking records), then workers and the archiver, then NATS
# and the archive's object store.
for pidfile in .run/gateway*.pid .run/worker*.pid .run/archiver.pid .run/nats*.pid .run/s3.pid; do
  [ -f "$pidfile" ] || continue
  svc=$(basename "$pidfile" .pid)
  pid=$(cat "$pidfile")
  if kill -TERM "$pid" 2>/dev/null; then
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    echo "stopped $svc ($pid)"
  fi
  rm -f "$pidfile"
done
