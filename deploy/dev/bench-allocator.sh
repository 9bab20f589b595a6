#!/usr/bin/env bash
# What the gateway's allocator settings cost (ingest-gateway's main: mimalloc returning
# freed memory at once, so that the body budget bounds the resident size): single POSTs
# at BENCH_CONNECTIONS connections (wrk, post.lua), against the same gateway binary with
# the settings and with mimalloc's defaults (MIMALLOC_PURGE_DELAY=10, which the gateway
# then keeps), alternating BENCH_ROUNDS rounds of BENCH_SECONDS each in one run. Results
# on stdout and in .run/bench/allocator.txt (BENCHMARKS.md, "Memory").
#
# Settings: BENCH_CONNECTIONS (256), BENCH_ROUNDS (3), BENCH_SECONDS (10).
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/lib.sh
ulimit -n 65536 2>/dev/null || true
CONNS=${BENCH_CONNECTIONS:-256}
ROUNDS=${BENCH_ROUNDS:-3}
SECS=${BENCH_SECONDS:-10}
OUT=.run/bench
mkdir -p "$OUT"
command -v wrk >/dev/null || apt_install wrk
bench_prepare
NATS_PORT=24242 GATEWAY_PORT=18094
export NATS_URL="nats://127.0.0.1:$NATS_PORT"
GW_URL="http://127.0.0.1:$GATEWAY_PORT"
trap stop_started EXIT
start_nats single.conf "$NATS_PORT" 0 "$PWD/$OUT/js-allocator" "$OUT/nats-allocator.log"
COMPANY=$(python3 -c 'import uuid; print(uuid.uuid4())')
"$B/callcap-bench" body --company "$COMPANY" > "$OUT/allocator-one.json"
: > "$OUT/allocator.txt"
for round in $(seq 1 "$ROUNDS"); do
  for mode in settled defaults; do
    extra=()
    [ "$mode" = defaults ] && extra=(MIMALLOC_PURGE_DELAY=10)
    start_gateway "$B" "$GATEWAY_PORT" "$OUT/gateway-allocator.log" "${extra[@]}"
    KEY=$(create_key "$B" "$COMPANY" "bench-allocator" "$GW_URL")
    RUN="alloc-$mode-$round-$RANDOM" BENCH_BODY="$OUT/allocator-one.json" KEY="$KEY" \
      wrk -t2 -c"$CONNS" -d"${SECS}s" -s deploy/dev/post.lua "$GW_URL/v1/calls" > "$OUT/allocator-$mode-$round.txt" 2>&1 || true
    rps=$(sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p' "$OUT/allocator-$mode-$round.txt")
    rss=$(awk '/VmHWM/ {printf "%.0f", $2/1024}' "/proc/$GATEWAY_PID/status")
    echo "round $round $mode: ${rps} req/s, peak RSS ${rss} MiB" | tee -a "$OUT/allocator.txt"
    kill "$GATEWAY_PID"; wait "$GATEWAY_PID" 2>/dev/null || true
  done
done
