#!/usr/bin/env bash
# Reproduces BENCHMARKS.md: every figure next to its ceiling, measured in one run on this
# machine, everything on loopback. Takes about 10 minutes. Results: .run/bench/*.txt and a
# summary on stdout.
#
# Settings: BENCH_SECONDS (10) per wrk run; BENCH_ROWS (100000) for the worker figures.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/lib.sh
ulimit -n 65536 2>/dev/null || true
SECS=${BENCH_SECONDS:-10}
ROWS=${BENCH_ROWS:-100000}
OUT=.run/bench
mkdir -p "$OUT"
ensure_rust
ensure_nats_server
ensure_postgres
if ! command -v wrk >/dev/null; then
  log "installing wrk"
  apt-get update -qq && apt-get install -y -qq wrk >/dev/null
fi
log "building (release)"
# Two commands: `--bin` would filter the services' binaries out of a combined build.
cargo build --release --quiet -p ingest-gateway -p persist-worker
cargo build --release --quiet -p callcap-tests --bin callcap-bench
B=target/release
NATS_PORT=24222 GW_PORT=18081 CEIL_PORT=18080
export NATS_URL="nats://127.0.0.1:$NATS_PORT"
BENCH_DB_URL=$(with_database "$DATABASE_URL" callcap_bench)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

start_nats() { # $1: extra jetstream settings
  rm -rf "$OUT/js"; mkdir -p "$OUT/js"
  printf 'listen: 127.0.0.1:%s\njetstream {\n  store_dir: "%s"\n  %s\n}\n' "$NATS_PORT" "$PWD/$OUT/js" "$1" > "$OUT/nats.conf"
  "$NATS_SERVER_BIN" -c "$OUT/nats.conf" > "$OUT/nats.log" 2>&1 &
  NATS_PID=$!; PIDS+=("$NATS_PID")
  for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null && return 0; sleep 0.1; done
  die "nats-server did not start"
}
stop_nats() { kill "$NATS_PID" 2>/dev/null; wait "$NATS_PID" 2>/dev/null || true; }

start_gateway() {
  LISTEN_ADDR="127.0.0.1:$GW_PORT" RUST_LOG=warn "$B/ingest-gateway" > "$OUT/gateway.log" 2>&1 &
  GW_PID=$!; PIDS+=("$GW_PID")
  for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$GW_PORT/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
}
stop_gateway() { kill "$GW_PID" 2>/dev/null; wait "$GW_PID" 2>/dev/null || true; }
peak_rss_mb() { awk '/VmHWM/ {printf "%.0f", $2/1024}' "/proc/$1/status"; }

wrk_run() { # name url connections body-file
  local name=$1 url=$2 conns=$3 body=$4
  RUN="$name-$RANDOM" BENCH_BODY="$body" KEY="$KEY" \
    wrk -t2 -c"$conns" -d"${SECS}s" --latency -s deploy/bench/post.lua "$url" > "$OUT/$name.txt" 2>&1 || true
  local rps p50 p99 non2xx
  rps=$(awk '/Requests\/sec/ {print $2}' "$OUT/$name.txt")
  p50=$(awk '$1=="50%" {print $2}' "$OUT/$name.txt")
  p99=$(awk '$1=="99%" {print $2}' "$OUT/$name.txt")
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$OUT/$name.txt")
  printf '%-28s conns=%-5s req/s=%-10s p50=%-9s p99=%-9s non2xx=%s\n' "$name" "$conns" "$rps" "$p50" "$p99" "${non2xx:-0}" | tee -a "$OUT/summary.txt"
}

: > "$OUT/summary.txt"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r); nats-server $("$NATS_SERVER_BIN" --version | sed 's/.* //'); $(psql "$DATABASE_URL" -tAc 'select version()' | cut -d' ' -f1-2)" | tee -a "$OUT/summary.txt"
COMPANY=$(python3 -c 'import uuid; print(uuid.uuid4())')
"$B/callcap-bench" body --company "$COMPANY" > "$OUT/one.json"
"$B/callcap-bench" body --company "$COMPANY" --records 100 > "$OUT/batch100.json"
"$B/callcap-bench" body --company "$COMPANY" --records 1000 > "$OUT/batch1000.json"

for SYNC in default always; do
  log "JetStream fsync: $SYNC"
  echo "--- jetstream sync: $SYNC" | tee -a "$OUT/summary.txt"
  if [ "$SYNC" = always ]; then start_nats "sync_interval: always"; else start_nats ""; fi
  "$B/callcap-bench" broker --count 100000 --in-flight 512 | tee -a "$OUT/summary.txt"
  start_gateway
  KEY=$("$B/ingest-gateway" keys create --company "$COMPANY" --name bench | tail -n1)
  sleep 1
  for C in 64 256; do
    wrk_run "gateway-$SYNC-c$C" "http://127.0.0.1:$GW_PORT/v1/calls" "$C" "$OUT/one.json"
  done
  echo "gateway peak RSS after load: $(peak_rss_mb "$GW_PID") MiB" | tee -a "$OUT/summary.txt"
  if [ "$SYNC" = default ]; then
    wrk_run "batch100" "http://127.0.0.1:$GW_PORT/v1/calls/batch" 32 "$OUT/batch100.json"
    # 4 x 1000 records stay under MAX_IN_FLIGHT_PUBLISHES (8192); more would measure 503s.
    wrk_run "batch1000" "http://127.0.0.1:$GW_PORT/v1/calls/batch" 4 "$OUT/batch1000.json"
    wrk_run "gateway-overload-c2560" "http://127.0.0.1:$GW_PORT/v1/calls" 2560 "$OUT/one.json"
    echo "gateway peak RSS after 10x overload: $(peak_rss_mb "$GW_PID") MiB" | tee -a "$OUT/summary.txt"
  fi
  stop_gateway
  stop_nats
done

log "HTTP ceiling"
echo "--- ceilings" | tee -a "$OUT/summary.txt"
"$B/callcap-bench" http-ceiling --listen "127.0.0.1:$CEIL_PORT" 2>/dev/null &
CEIL_PID=$!; PIDS+=("$CEIL_PID")
sleep 0.5
for C in 64 256; do
  KEY=x wrk_run "http-ceiling-c$C" "http://127.0.0.1:$CEIL_PORT/v1/calls" "$C" "$OUT/one.json"
done
kill "$CEIL_PID"

log "worker vs database ceiling ($ROWS rows)"
echo "--- worker" | tee -a "$OUT/summary.txt"
psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS callcap_bench WITH (FORCE)"
DATABASE_URL="$BENCH_DB_URL" "$B/persist-worker" migrate >/dev/null
start_nats ""
"$B/callcap-bench" db-ceiling --database-url "$BENCH_DB_URL" --count "$ROWS" | tee -a "$OUT/summary.txt"
"$B/callcap-bench" broker --count "$ROWS" --in-flight 512 > /dev/null
"$B/callcap-bench" worker --database-url "$BENCH_DB_URL" --count "$ROWS" | tee -a "$OUT/summary.txt"

log "end to end"
echo "--- end to end" | tee -a "$OUT/summary.txt"
psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS callcap_bench WITH (FORCE)"
DATABASE_URL="$BENCH_DB_URL" "$B/persist-worker" migrate >/dev/null
stop_nats; start_nats ""
start_gateway
DATABASE_URL="$BENCH_DB_URL" METRICS_ADDR=127.0.0.1:19091 RUST_LOG=warn "$B/persist-worker" > "$OUT/worker.log" 2>&1 &
PIDS+=("$!")
KEY=$("$B/ingest-gateway" keys create --company "$COMPANY" --name bench | tail -n1)
sleep 1
"$B/callcap-bench" e2e --gateway "http://127.0.0.1:$GW_PORT" --key "$KEY" --company "$COMPANY" \
  --database-url "$BENCH_DB_URL" --seconds "$SECS" --concurrency 128 | tee -a "$OUT/summary.txt"
psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS callcap_bench WITH (FORCE)"
log "done: $OUT/summary.txt"
