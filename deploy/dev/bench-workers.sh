#!/usr/bin/env bash
# Scaling workers: how fast 1, 2 and 4 persist-worker processes drain a filled stream
# into Postgres, each next to the database ceiling measured in the same round
# (callcap-bench db-ceiling: plain INSERT … SELECT FROM UNNEST into a copy of the table).
# Takes a few minutes. Results on stdout and in .run/bench/workers.txt (BENCHMARKS.md,
# "Scaling workers").
#
# Settings: BENCH_ROWS (100000) per round; BENCH_WORKERS ("1 2 4"); BENCH_WORKER_BIN_DIR
# (the persist-worker to measure, e.g. another commit's release build; default this one's).
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
BENCH_DB_URL=$(with_database "$DATABASE_URL" callcap_bench)
trap stop_started EXIT

count_rows() { psql "$BENCH_DB_URL" -tAc "select count(*) from call_history"; }

TABLE="$OUT/workers.txt"
{
  echo "| workers | rows/s | db ceiling (same round) | ratio | cores |"
  echo "|---|---|---|---|---|"
} > "$TABLE"
for N in $COUNTS; do
  log "round: $N worker(s), $ROWS rows"
  psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS callcap_bench WITH (FORCE)"
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
  echo "| $N | $RATE | $CEIL | $RATIO | $(nproc) |" | tee -a "$TABLE"
  for p in "${WPIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  kill "$NATS_PID" 2>/dev/null || true
  wait 2>/dev/null || true
done
echo
cat "$TABLE"
