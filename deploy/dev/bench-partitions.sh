#!/usr/bin/env bash
# Partitions: P = 1 vs P = 3 on a 3-node loopback JetStream cluster (R3, sync_interval
# always). Each round: a fresh cluster, `ingest-gateway partitions set P`, one gateway,
# one worker; 16 companies post single records (callcap-bench e2e, 128 connections in all)
# for BENCH_SECS, then the lag from 201 to row is read. On 2 cores no gain is expected:
# three nodes, the gateway, the worker, Postgres and the load share them; what P = 3 buys
# is leaders spread over the nodes (printed) and a smaller blast radius (the cluster test
# `partitions::on_a_cluster_a_killed_leader_stops_only_its_partitions_companies`).
# Results on stdout and in .run/bench/partitions.txt (BENCHMARKS.md, "Partitions").
#
# Settings: BENCH_SECS (15), BENCH_PARTITIONS ("1 3"), BENCH_WORKER_BIN_DIR (the
# persist-worker to measure, e.g. another commit's release build; default this one's).
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/lib.sh
SECS=${BENCH_SECS:-15}
COUNTS=${BENCH_PARTITIONS:-1 3}
OUT=.run/bench
mkdir -p "$OUT"
bench_prepare
WB=${BENCH_WORKER_BIN_DIR:-$B}
NATS_PORT=24422 MON=24432 ROUTE=24442 GATEWAY_PORT=18281
export NATS_URL="nats://127.0.0.1:$NATS_PORT,nats://127.0.0.1:$((NATS_PORT + 1)),nats://127.0.0.1:$((NATS_PORT + 2))"
export STREAM_REPLICAS=3
BENCH_DB_URL=$(with_database "$DATABASE_URL" callcap_bench_partitions)
GW_URL="http://127.0.0.1:$GATEWAY_PORT"
trap stop_started EXIT

start_cluster() {
  NODE_PIDS=()
  for i in 1 2 3; do
    rm -rf "$PWD/$OUT/js-part-n$i"; mkdir -p "$PWD/$OUT/js-part-n$i"
    start_bg "$OUT/nats-part-$i.log" env CALLCAP_NODE="n$i" CALLCAP_CLUSTER_LISTEN="127.0.0.1:$((ROUTE + i - 1))" \
      CALLCAP_ROUTE_1="nats://callcap-route:$CALLCAP_ROUTE_PASSWORD@127.0.0.1:$ROUTE" \
      CALLCAP_ROUTE_2="nats://callcap-route:$CALLCAP_ROUTE_PASSWORD@127.0.0.1:$((ROUTE + 1))" \
      CALLCAP_ROUTE_3="nats://callcap-route:$CALLCAP_ROUTE_PASSWORD@127.0.0.1:$((ROUTE + 2))" \
      "$NATS_SERVER_BIN" -c deploy/nats/cluster.conf -a 127.0.0.1 -p "$((NATS_PORT + i - 1))" \
      -m "$((MON + i - 1))" -sd "$PWD/$OUT/js-part-n$i"
    NODE_PIDS+=("$LAST_PID")
  done
  for i in 1 2 3; do wait_tcp "$((NATS_PORT + i - 1))" 10 || die "node $i did not start"; done
  # JetStream is ready once the meta group has a leader.
  for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$MON/jsz" | grep -q '"meta_cluster"' && \
      curl -sf "http://127.0.0.1:$MON/jsz" | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin).get("meta_cluster",{}).get("leader") else 1)' && break
    sleep 0.2
  done
}

TABLE="$OUT/partitions.txt"
{
  echo "| partitions | stream leaders | records/s accepted | p50 201 → row | p99 201 → row | cores |"
  echo "|---|---|---|---|---|---|"
} > "$TABLE"
declare -A RATE
for P in $COUNTS; do
  log "round: P = $P"
  psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS callcap_bench_partitions WITH (FORCE)"
  DATABASE_URL="$BENCH_DB_URL" "$B/persist-worker" migrate >/dev/null
  start_cluster
  SET=$("$B/ingest-gateway" partitions set "$P" --no-wait)
  echo "$SET" >> "$OUT/partitions-raw.txt"
  LEADERS=$(sed -n 's/^\(CALLS[_A-Z0-9]*\) led by \(n[0-9]\).*/\2/p' <<< "$SET" | paste -sd, -)
  start_gateway "$B" "$GATEWAY_PORT" "$OUT/gateway-part.log"
  start_worker "$WB" 19291 "$BENCH_DB_URL" "$OUT/worker-part.log" NO_MIGRATE=true
  E2E_PIDS=()
  KEYS=()
  for c in $(seq 1 16); do
    COMPANY=$(python3 -c 'import uuid; print(uuid.uuid4())')
    KEYS+=("$COMPANY $(create_key "$B" "$COMPANY" "bench-$c" "$GW_URL")")
  done
  for c in $(seq 1 16); do
    read -r COMPANY KEY <<< "${KEYS[$((c - 1))]}"
    "$B/callcap-bench" e2e --gateway "$GW_URL" --key "$KEY" --company "$COMPANY" \
      --database-url "$BENCH_DB_URL" --seconds "$SECS" --concurrency 8 > "$OUT/part-$P-$c.txt" &
    E2E_PIDS+=("$!")
  done
  wait "${E2E_PIDS[@]}" || true
  RATE[$P]=$(cat "$OUT"/part-"$P"-*.txt | sed -n 's/.*records_per_sec=\([0-9.]*\).*/\1/p' | python3 -c 'import sys; print(round(sum(float(x) for x in sys.stdin)))')
  P50=$(cat "$OUT"/part-"$P"-*.txt | sed -n 's/.*lag_p50_ms=\([0-9.]*\).*/\1/p' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  P99=$(cat "$OUT"/part-"$P"-*.txt | sed -n 's/.*lag_p99_ms=\([0-9.]*\).*/\1/p' | sort -n | tail -1)
  echo "| $P | ${LEADERS:-n/a} | ${RATE[$P]} | ${P50} ms (median of companies) | ${P99} ms (worst company) | $(nproc) |" | tee -a "$TABLE"
  kill "$WORKER_PID" "$GATEWAY_PID" "${NODE_PIDS[@]}" 2>/dev/null || true
  wait "$WORKER_PID" "$GATEWAY_PID" "${NODE_PIDS[@]}" 2>/dev/null || true
done
if [ -n "${RATE[1]:-}" ] && [ -n "${RATE[3]:-}" ]; then
  echo >> "$TABLE"
  echo "P = 3 / P = 1 accepted: $(python3 -c "print(f'{${RATE[3]} / ${RATE[1]}:.2f}')")" | tee -a "$TABLE"
fi
echo
cat "$TABLE"
