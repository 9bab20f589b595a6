#!/usr/bin/env bash
# Erasure's stream deletes: JetStream's message delete (which overwrites the payload) of
# BENCH_ROWS messages on the shipped single.conf (fsync before every ack), the first half
# one request at a time (what `erase` did), the second half DELETES_IN_FLIGHT at once
# (what it does now), in the same run. Results on stdout and in .run/bench/erase.txt
# (BENCHMARKS.md, "Erasure").
#
# Settings: BENCH_ROWS (20880: twice the third probe's 10,440); BENCH_IN_FLIGHT (64).
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/lib.sh
ROWS=${BENCH_ROWS:-20880}
OUT=.run/bench
mkdir -p "$OUT"
bench_prepare
NATS_PORT=24232
export NATS_URL="nats://127.0.0.1:$NATS_PORT"
trap stop_started EXIT
rm -rf "$OUT/js-erase"
start_nats single.conf "$NATS_PORT" 0 "$PWD/$OUT/js-erase" "$OUT/nats-erase.log"
log "filling the stream with $ROWS records"
"$B/callcap-bench" broker --count "$ROWS" --in-flight 2 --atomic-batch 1000 > /dev/null
log "deleting them"
"$B/callcap-bench" delete-messages --in-flight "${BENCH_IN_FLIGHT:-64}" | tee "$OUT/erase.txt"
