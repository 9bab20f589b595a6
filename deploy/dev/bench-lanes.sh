#!/usr/bin/env bash
# Lanes: a quiet company's lag while another company's burst outruns storage, with one
# lane (OVERFLOW_RATE=0: every record in one FIFO) and with lanes (the default
# OVERFLOW_RATE), on a warm database (300k rows, analysed) and on a fresh one (the
# worker's first statements planned on an empty table, then the burst). The quiet company
# posts one record every 100 ms throughout; after 8 s the hot company floods
# /v1/calls/batch (8 connections, 500 records a request) for 20 s. The worker is slowed
# (BATCH_SIZE=200, BATCHES_IN_FLIGHT=1) so that the burst outruns storage; `outrun` in
# the table is accepted/s over drained/s. Takes ~10 minutes. Results on stdout and in
# .run/bench/lanes.txt (BENCHMARKS.md, "Lanes").
#
# Settings: BENCH_BURST_SECS (20), BENCH_WORKER_BATCH (200), BENCH_WORKER_IN_FLIGHT (1),
# BENCH_DBS ("warm fresh"), BENCH_MODES ("one-lane lanes"), BENCH_WORKER_BIN_DIR (the
# persist-worker to measure, e.g. another commit's release build; default this one's).
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/lib.sh
BURST=${BENCH_BURST_SECS:-20}
WBATCH=${BENCH_WORKER_BATCH:-200}
WINFLIGHT=${BENCH_WORKER_IN_FLIGHT:-1}
DBS=${BENCH_DBS:-warm fresh}
MODES=${BENCH_MODES:-one-lane lanes}
OUT=.run/bench
mkdir -p "$OUT"
bench_prepare
WB=${BENCH_WORKER_BIN_DIR:-$B}
NATS_PORT=24322 NATS_MONITOR_PORT=24323 GATEWAY_PORT=18181
export NATS_URL="nats://127.0.0.1:$NATS_PORT"
BENCH_DB_URL=$(with_database "$DATABASE_URL" callcap_bench_lanes)
GW_URL="http://127.0.0.1:$GATEWAY_PORT"
trap stop_started EXIT

TABLE="$OUT/lanes.txt"
{
  echo "| database | mode | hot accepted/s | hot drained/s | outrun | quiet baseline p99 | quiet p50 | quiet p99 | quiet max | p99 target | cores |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
} > "$TABLE"
declare -A DRAIN
for DB in $DBS; do
  for MODE in $MODES; do
    log "round: $DB database, $MODE"
    psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS callcap_bench_lanes WITH (FORCE)"
    DATABASE_URL="$BENCH_DB_URL" "$B/persist-worker" migrate >/dev/null
    if [ "$DB" = warm ]; then
      # A database that has been in use: 300k calls of other companies, analysed.
      psql "$BENCH_DB_URL" -qc "INSERT INTO call_history (id, company_id, call_date, call_date_given, \
        received_at, stream_seq, external_call_id, external_system) \
        SELECT gen_random_uuid(), gen_random_uuid(), now(), true, now(), 0, 'W' || g, 'warm' \
        FROM generate_series(1, 300000) g" -c "ANALYZE"
    fi
    start_nats single.conf "$NATS_PORT" "$NATS_MONITOR_PORT" "$PWD/$OUT/js-lanes" "$OUT/nats-lanes.log"
    if [ "$MODE" = one-lane ]; then RATE=0; else RATE=1000; fi
    start_gateway "$B" "$GATEWAY_PORT" "$OUT/gateway-lanes.log" OVERFLOW_RATE="$RATE"
    start_worker "$WB" 19191 "$BENCH_DB_URL" "$OUT/worker-lanes.log" NO_MIGRATE=true \
      BATCH_SIZE="$WBATCH" BATCHES_IN_FLIGHT="$WINFLIGHT"
    HOT=$(python3 -c 'import uuid; print(uuid.uuid4())')
    QUIET=$(python3 -c 'import uuid; print(uuid.uuid4())')
    HOT_KEY=$(create_key "$B" "$HOT" hot "$GW_URL")
    QUIET_KEY=$(create_key "$B" "$QUIET" quiet "$GW_URL")
    LINE=$("$B/callcap-bench" isolation --gateway "$GW_URL" --database-url "$BENCH_DB_URL" \
      --hot-key "$HOT_KEY" --hot-company "$HOT" --quiet-key "$QUIET_KEY" --quiet-company "$QUIET" \
      --burst-secs "$BURST")
    echo "$LINE" >> "$OUT/lanes-raw.txt"
    get() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<< "$LINE"; }
    BASE=$(get quiet_baseline_p99_ms)
    TARGET=$(python3 -c "print(max(2 * $BASE, 250))")
    DRAIN[$DB-$MODE]=$(get drain_rate)
    echo "| $DB | $MODE | $(get accept_rate) | $(get drain_rate) | $(get outrun) | ${BASE} ms | $(get quiet_p50_ms) ms | $(get quiet_p99_ms) ms | $(get quiet_max_ms) ms | ≤ ${TARGET} ms | $(nproc) |" | tee -a "$TABLE"
    kill "$WORKER_PID" "$GATEWAY_PID" 2>/dev/null || true
    wait "$WORKER_PID" "$GATEWAY_PID" 2>/dev/null || true
    kill "$NATS_PID" 2>/dev/null || true
    wait "$NATS_PID" 2>/dev/null || true
  done
done
echo >> "$TABLE"
for DB in $DBS; do
  if [ -n "${DRAIN[$DB-one-lane]:-}" ] && [ -n "${DRAIN[$DB-lanes]:-}" ]; then
    echo "$DB database: hot drain with lanes / one lane = $(python3 -c "print(f'{${DRAIN[$DB-lanes]} / ${DRAIN[$DB-one-lane]}:.2f}')")" | tee -a "$TABLE"
  fi
done
echo
cat "$TABLE"
