#!/usr/bin/env bash
# What traces cost the gateway's hot path: single POSTs at BENCH_CONNECTIONS connections
# (wrk, post.lua) against
#   before - the previous commit's gateway (BENCH_BEFORE_BIN_DIR, its target/release), if given;
#   off    - this gateway, no OTEL_EXPORTER_OTLP_ENDPOINT (traces off: the default);
#   on     - this gateway exporting every request's trace (auth, validate, publish and the
#            atomic batch's span) to an OTLP/HTTP receiver (tests/otlp/receiver.py --count);
#   ratio  - the same at OTEL_TRACES_SAMPLER=traceidratio, OTEL_TRACES_SAMPLER_ARG=0.1.
# Modes alternate within each of BENCH_ROUNDS rounds of BENCH_SECONDS each, every mode on a
# fresh nats-server store, so the machine's noise falls on all of them alike. Results on
# stdout and in .run/bench/traces.txt (BENCHMARKS.md, "Traces").
#
# Settings: BENCH_CONNECTIONS (256), BENCH_ROUNDS (3), BENCH_SECONDS (10),
# BENCH_BEFORE_BIN_DIR (none).
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/lib.sh
ulimit -n 65536 2>/dev/null || true
CONNS=${BENCH_CONNECTIONS:-256}
ROUNDS=${BENCH_ROUNDS:-3}
SECS=${BENCH_SECONDS:-10}
BEFORE=${BENCH_BEFORE_BIN_DIR:-}
OUT=.run/bench
mkdir -p "$OUT"
command -v wrk >/dev/null || apt_install wrk
ensure_otlp_proto
bench_prepare
NATS_PORT=24243 GATEWAY_PORT=18095
export NATS_URL="nats://127.0.0.1:$NATS_PORT"
GW_URL="http://127.0.0.1:$GATEWAY_PORT"
trap stop_started EXIT
COUNT="$PWD/$OUT/traces-spans.txt"
: > "$COUNT"
start_bg "$OUT/otlp-receiver.log" python3 tests/otlp/receiver.py "$COUNT" --count
RECEIVER_PID=$LAST_PID
for _ in $(seq 1 50); do
  RECEIVER_PORT=$(head -n1 "$OUT/otlp-receiver.log" 2>/dev/null || true)
  [ -n "$RECEIVER_PORT" ] && break
  sleep 0.2
done
[ -n "$RECEIVER_PORT" ] || die "the OTLP receiver did not start (see $OUT/otlp-receiver.log)"
COMPANY=$(python3 -c 'import uuid; print(uuid.uuid4())')
"$B/callcap-bench" body --company "$COMPANY" > "$OUT/traces-one.json"
modes="off on ratio"
[ -n "$BEFORE" ] && modes="before $modes"
: > "$OUT/traces.txt"
for round in $(seq 1 "$ROUNDS"); do
  for mode in $modes; do
    bin=$B extra=()
    case $mode in
      before) bin=$BEFORE ;;
      on) extra=(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$RECEIVER_PORT") ;;
      ratio) extra=(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$RECEIVER_PORT"
                    OTEL_TRACES_SAMPLER=traceidratio OTEL_TRACES_SAMPLER_ARG=0.1) ;;
    esac
    start_nats single.conf "$NATS_PORT" 0 "$PWD/$OUT/js-traces" "$OUT/nats-traces.log"
    start_gateway "$bin" "$GATEWAY_PORT" "$OUT/gateway-traces-$mode.log" "${extra[@]}"
    KEY=$(create_key "$B" "$COMPANY" "bench-traces" "$GW_URL")
    spans_before=$(cat "$COUNT" 2>/dev/null || echo 0); spans_before=${spans_before:-0}
    RUN="traces-$mode-$round-$RANDOM" BENCH_BODY="$OUT/traces-one.json" KEY="$KEY" \
      wrk --latency -t2 -c"$CONNS" -d"${SECS}s" -s deploy/dev/post.lua "$GW_URL/v1/calls" > "$OUT/traces-$mode-$round.txt" 2>&1 || true
    kill "$GATEWAY_PID"; wait "$GATEWAY_PID" 2>/dev/null || true
    kill "$NATS_PID"; wait "$NATS_PID" 2>/dev/null || true
    sleep 0.5
    rps=$(sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p' "$OUT/traces-$mode-$round.txt")
    p50=$(awk '$1 == "50%" {print $2}' "$OUT/traces-$mode-$round.txt")
    p99=$(awk '$1 == "99%" {print $2}' "$OUT/traces-$mode-$round.txt")
    non2xx=$(sed -n 's/^ *Non-2xx or 3xx responses: *\([0-9]*\).*/\1/p' "$OUT/traces-$mode-$round.txt")
    spans_after=$(cat "$COUNT" 2>/dev/null || echo 0); spans_after=${spans_after:-0}
    echo "round $round $mode: ${rps} req/s, p50 ${p50}, p99 ${p99}, non-2xx ${non2xx:-0}, spans received $((spans_after - spans_before))" | tee -a "$OUT/traces.txt"
  done
done
