#!/usr/bin/env bash
# Soak: the whole pipeline under steady load for a long time, the worker restarted on a
# schedule (SIGTERM, as a rolling deploy does). Reports the resident memory of both
# binaries at the start and the end, the lag from each 201 to its row, and fails unless
# every accepted record was stored (once: rows are keyed by call_history_id).
#
# First measures the end-to-end rate on this machine for 10 s, then runs at half of it.
#
# Settings: SOAK_SECONDS (120; BENCHMARKS.md's figure is 1800), SOAK_RESTART_SECONDS (30;
# BENCHMARKS.md: 300), SOAK_RATE (records/s; default: half the measured end-to-end rate),
# SOAK_BUILD (release; CI uses the debug build its tests already made, at a low rate),
# SOAK_NAME (soak: the results directory .run/NAME and the database callcap_NAME) and
# SOAK_PORT_OFFSET (0: added to the ports 25222 (NATS), 25223 (its monitor), 18091 (the
# gateway), 19191 (the worker's metrics)), so that two soaks can share a machine.
# Results: .run/soak/summary.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/lib.sh
SECONDS_TOTAL=${SOAK_SECONDS:-120}
RESTART=${SOAK_RESTART_SECONDS:-30}
NAME=${SOAK_NAME:-soak}
OUT=.run/$NAME
mkdir -p "$OUT"
ensure_rust
ensure_nats_server
ensure_postgres
BUILD=${SOAK_BUILD:-release}
case $BUILD in release) FLAGS=(--release) ;; debug) FLAGS=() ;; *) die "SOAK_BUILD is release or debug" ;; esac
log "building ($BUILD)"
# Two commands: `--bin` would filter the services' binaries out of a combined build.
if [ "$BUILD" = debug ]; then
  # After `cargo test --workspace` (CI): the same packages and features, so nothing is
  # built again with another feature set.
  cargo build --quiet --workspace --all-targets
else
  cargo build "${FLAGS[@]}" --quiet -p ingest-gateway -p persist-worker
  cargo build "${FLAGS[@]}" --quiet -p callcap-tests --bin callcap-bench
fi
B=target/$BUILD
ensure_nkeys "$PWD/.run/nkeys" "$B/ingest-gateway"
export NATS_NKEY_FILE="$CALLCAP_NKEY_DIR/admin.nk"
OFF=${SOAK_PORT_OFFSET:-0}
NATS_PORT=$((25222 + OFF)) NATS_MONITOR_PORT=$((25223 + OFF)) GATEWAY_PORT=$((18091 + OFF)) METRICS_PORT=$((19191 + OFF))
export NATS_URL="nats://127.0.0.1:$NATS_PORT"
DB_NAME=callcap_${NAME//[^a-z0-9_]/_}
DB_URL=$(with_database "$DATABASE_URL" "$DB_NAME")
trap stop_started EXIT
rss_mb() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }

psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $DB_NAME WITH (FORCE)"
DATABASE_URL="$DB_URL" "$B/persist-worker" migrate >/dev/null
start_nats single.conf "$NATS_PORT" "$NATS_MONITOR_PORT" "$PWD/$OUT/js" "$OUT/nats.log"
start_gateway "$B" "$GATEWAY_PORT" "$OUT/gateway.log"
GW_PID=$GATEWAY_PID
GW_URL="http://127.0.0.1:$GATEWAY_PORT"
start_worker "$B" "$METRICS_PORT" "$DB_URL" "$OUT/worker-1.log"
new_company() { python3 -c 'import uuid; print(uuid.uuid4())'; }
key_for() { create_key "$B" "$1" soak "$GW_URL"; }

: > "$OUT/summary.txt"
COMPANY=$(new_company); KEY=$(key_for "$COMPANY")
if [ -z "${SOAK_RATE:-}" ]; then
  log "measuring the end-to-end rate (10 s)"
  "$B/callcap-bench" e2e --gateway "$GW_URL" --key "$KEY" --company "$COMPANY" \
    --database-url "$DB_URL" --seconds 10 --concurrency 128 | tee -a "$OUT/summary.txt"
  E2E=$(sed -n 's/.*records_per_sec=\([0-9]*\).*/\1/p' "$OUT/summary.txt" | tail -n1)
  SOAK_RATE=$(( E2E / 2 ))
fi
echo "soak: ${SECONDS_TOTAL} s at ${SOAK_RATE} records/s, worker restarted (SIGTERM) every ${RESTART} s" | tee -a "$OUT/summary.txt"
COMPANY=$(new_company); KEY=$(key_for "$COMPANY")
"$B/callcap-bench" e2e --gateway "$GW_URL" --key "$KEY" --company "$COMPANY" \
  --database-url "$DB_URL" --seconds "$SECONDS_TOTAL" --concurrency 64 --rate "$SOAK_RATE" > "$OUT/e2e.txt" 2>&1 &
LOAD_PID=$!
sleep 10
GW_START=$(rss_mb "$GW_PID"); WORKER_START=$(rss_mb "$WORKER_PID")
echo "after 10 s: gateway RSS ${GW_START} MiB, worker RSS ${WORKER_START} MiB" | tee -a "$OUT/summary.txt"
ELAPSED=10; RESTARTS=0
while [ "$ELAPSED" -lt "$SECONDS_TOTAL" ] && kill -0 "$LOAD_PID" 2>/dev/null; do
  STEP=$(( RESTART - ELAPSED % RESTART )); [ "$STEP" -gt $(( SECONDS_TOTAL - ELAPSED )) ] && STEP=$(( SECONDS_TOTAL - ELAPSED ))
  sleep "$STEP"; ELAPSED=$(( ELAPSED + STEP ))
  [ "$ELAPSED" -ge "$SECONDS_TOTAL" ] && break
  echo "at ${ELAPSED} s: gateway RSS $(rss_mb "$GW_PID") MiB, worker RSS $(rss_mb "$WORKER_PID") MiB; restarting the worker" | tee -a "$OUT/summary.txt"
  kill -TERM "$WORKER_PID"; wait "$WORKER_PID" 2>/dev/null || true
  RESTARTS=$(( RESTARTS + 1 ))
  start_worker "$B" "$METRICS_PORT" "$DB_URL" "$OUT/worker-$((RESTARTS + 1)).log"
done
echo "at the end: gateway RSS $(rss_mb "$GW_PID") MiB (start ${GW_START}), worker RSS $(rss_mb "$WORKER_PID") MiB (start ${WORKER_START}), ${RESTARTS} worker restarts" | tee -a "$OUT/summary.txt"
STATUS=0
wait "$LOAD_PID" || STATUS=$?
tee -a "$OUT/summary.txt" < "$OUT/e2e.txt"
STORED=$(psql "$DB_URL" -tAc "SELECT count(*) FROM call_history WHERE company_id = '$COMPANY'")
echo "rows for the soak's company: $STORED" | tee -a "$OUT/summary.txt"
[ "$STATUS" -eq 0 ] || die "the soak lost records (see $OUT/e2e.txt)"
# Flat memory: the gateway runs the whole soak, so growth shows there. Allowed: allocator
# and connection warm-up (16 MiB) on top of what it held after 10 s; a per-request leak
# of a few dozen bytes crosses it within the 30-minute run.
python3 -c "import sys; s, e = float(sys.argv[1]), float(sys.argv[2]); sys.exit(0 if e <= s + 16 else 1)" \
  "$GW_START" "$(rss_mb "$GW_PID")" || die "the gateway's memory grew during the soak (see $OUT/summary.txt)"
log "soak passed: $OUT/summary.txt"
