#!/usr/bin/env bash
# Scaling workers: how fast 1, 2 and 4 persist-worker processes drain a filled stream
# into Postgres, each next to the database ceiling measured in the same round
# (callcap-bench db-ceiling: plain INSERT … SELECT FROM UNNEST into a copy of the table).
# Takes a few minutes. Results on stdout and in .run/bench/workers.txt (BENCHMARKS.md,
# "Scaling workers").
#
# Settings: BENCH_ROWS (100000) per round; BENCH_WORKERS ("1 2 4"); BENCH_WORKER_BIN_DIR
# (the persist-worker to measure, e.g. another commit's release build; default this one's);
# BENCH_DATABASE_URLS (servers to measure in turn within each round, e.g. PostgreSQL 15 and
# 18: "$DATABASE_URL $PG18_URL"; default DATABASE_URL alone).
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/lib.sh
ROWS=${BENCH_ROWS:-100000}
COUNTS=${BENCH_WORKERS:-1 2 4}
OUT=.run/bench
mkdir -p "$OUT"
bench_prepare
WB=${BENCH_WORKER_BIN_DIR:-$B}
NATS_PORT=24222
export NATS_URL="nats://127.0.0.1:$NATS_PORT"
SERVERS=${BENCH_DATABASE_URLS:-$DATABASE_URL}
trap stop_started EXIT

TABLE="$OUT/workers.txt"
{
  echo "| workers | server | rows/s | db ceiling (same round) | ratio | cores |"
  echo "|---|---|---|---|---|---|"
} > "$TABLE"
for N in $COUNTS; do
  for SERVER in $SERVERS; do
  BENCH_DB_URL=$(with_database "$SERVER" callcap_bench)
  VERSION=$(psql "$SERVER" -tAc "show server_version" | cut -d' ' -f1)
  count_rows() { psql "$BENCH_DB_URL" -tAc "select count(*) from call_history"; }
  log "round: $N worker(s), $ROWS rows, PostgreSQL $VERSION"
  psql "$SERVER" -qc "DROP DATABASE IF EXISTS callcap_bench WITH (FORCE)"
  psql "$SERVER" -qc "CREATE DATABASE callcap_bench" 2>/dev/null || true
  DATABASE_URL="$BENCH_DB_URL" "$B/persist-worker" migrate >/dev/null
  start_nats single.conf "$NATS_PORT" 0 "$PWD/$OUT/js-workers" "$OUT/nats-workers.log"
  CEIL=$("$B/callcap-bench" db-ceiling --database-url "$BENCH_DB_URL" --count "$ROWS" | sed -n 's/.*rows_per_sec=\([0-9]*\).*/\1/p')
  "$B/callcap-bench" broker --count "$ROWS" --in-flight 2 --atomic-batch 1000 > /dev/null
  WPIDS=()
  for i in $(seq 1 "$N"); do
    start_worker "$WB" "$((19100 + i))" "$BENCH_DB_URL" "$OUT/worker-$N-$i.log" NO_MIGRATE=true
    WPIDS+=("$WORKER_PID")
  done
  for _ in $(seq 1 6000); do [ "$(count_rows)" -ge "$ROWS" ] && break; sleep 0.1; done
  [ "$(count_rows)" -ge "$ROWS" ] || die "workers did not store $ROWS rows"
  # First to last commit, from the rows themselves (start-up not counted).
  SPAN=$(psql "$BENCH_DB_URL" -tAc "select extract(epoch from max(stored_at) - min(stored_at)) from call_history")
  RATE=$(python3 -c "print(round($ROWS / max($SPAN, 0.001)))")
  RATIO=$(python3 -c "print(f'{$RATE / $CEIL:.2f}')")
  echo "| $N | $VERSION | $RATE | $CEIL | $RATIO | $(nproc) |" | tee -a "$TABLE"
  for p in "${WPIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  kill "$NATS_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  done
done
echo
cat "$TABLE"
