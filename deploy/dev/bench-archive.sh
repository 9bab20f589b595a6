#!/usr/bin/env bash
# The archive: how fast `persist-worker archive` copies a filled stream into a real
# S3-compatible store (SeaweedFS on loopback), next to the stream's own read rate
# measured in the same run (callcap-bench stream-read: one ordered consumer reading it
# whole, doing nothing else); and how fast `replay --from-archive` rebuilds a database
# next to `replay --from-seq 1` from the stream, each into a fresh database.
# Results on stdout and in .run/bench/archive.txt (BENCHMARKS.md, "Archive").
#
# Settings: BENCH_ROWS (100000); BENCH_OBJECT_RECORDS (10000).
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/lib.sh
ROWS=${BENCH_ROWS:-100000}
OBJ=${BENCH_OBJECT_RECORDS:-10000}
OUT=.run/bench
mkdir -p "$OUT"
bench_prepare
ensure_seaweedfs
NATS_PORT=24222
S3_PORT=24333
export NATS_URL="nats://127.0.0.1:$NATS_PORT"
trap stop_started EXIT
now() { python3 -c 'import time; print(time.time())'; }

rm -rf "$OUT/s3-archive"; mkdir -p "$OUT/s3-archive"
start_s3 "$PWD/$OUT/s3-archive" "$S3_PORT" bench "$OUT/s3-archive.log" 256
export ARCHIVE_URL="s3://bench/calls-$(date +%s)"

start_nats single.conf "$NATS_PORT" 0 "$PWD/$OUT/js-archive" "$OUT/nats-archive.log"
log "filling the stream with $ROWS records"
"$B/callcap-bench" broker --count "$ROWS" --in-flight 2 --atomic-batch 1000 > /dev/null
READ=$("$B/callcap-bench" stream-read | sed -n 's/.*msgs_per_sec=\([0-9]*\).*/\1/p')

DB_A=$(with_database "$DATABASE_URL" callcap_bench_archive)
psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS callcap_bench_archive WITH (FORCE)"
DATABASE_URL="$DB_A" "$B/persist-worker" migrate >/dev/null
log "archiving (objects of $OBJ records)"
start_bg "$OUT/archiver.log" env DATABASE_URL="$DB_A" METRICS_ADDR=127.0.0.1:19190 \
  NATS_NKEY_FILE="$CALLCAP_NKEY_DIR/worker.nk" ARCHIVE_OBJECT_RECORDS="$OBJ" ARCHIVE_LINGER_SECS=1 \
  RUST_LOG=warn "$B/persist-worker" archive
ARCHIVER_PID=$LAST_PID
position() { curl -sf http://127.0.0.1:19190/metrics | sed -n 's/^archive_position{stream="CALLS"} \([0-9.e+]*\)$/\1/p' | python3 -c 'import sys; t=sys.stdin.read().strip(); print(int(float(t)) if t else 0)'; }
# Steady state: from the first object written (start-up, the consumer made anew and the
# archive's position read, left out) to the last.
P0=0
for _ in $(seq 1 6000); do P0=$(position) || P0=0; [ "$P0" -gt 0 ] && break; sleep 0.02; done
T0=$(now)
for _ in $(seq 1 6000); do P=$(position) || P=0; [ "$P" -ge "$ROWS" ] && break; sleep 0.05; done
[ "$P" -ge "$ROWS" ] || die "the archiver did not reach $ROWS (see $OUT/archiver.log)"
T1=$(now)
BYTES=$(curl -sf http://127.0.0.1:19190/metrics | sed -n 's/^archive_bytes_total{stream="CALLS"} \([0-9.e+]*\)$/\1/p')
kill "$ARCHIVER_PID"
ARCH=$(python3 -c "print(round(($ROWS - $P0) / ($T1 - $T0)))")

replay_rate() {
  local db=$1; shift
  psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)"
  local url; url=$(with_database "$DATABASE_URL" "$db")
  DATABASE_URL="$url" "$B/persist-worker" migrate >/dev/null
  local t0 t1; t0=$(now)
  DATABASE_URL="$url" NATS_NKEY_FILE="$CALLCAP_NKEY_DIR/admin.nk" RUST_LOG=warn "$B/persist-worker" replay --quiet "$@" >&2
  t1=$(now)
  [ "$(psql "$url" -tAc 'select count(*) from call_history')" -eq "$ROWS" ] || die "replay $* did not store $ROWS rows"
  python3 -c "print(round($ROWS / ($t1 - $t0)))"
}
log "replaying from the stream into a fresh database"
FROM_STREAM=$(replay_rate callcap_bench_replay_stream --from-seq 1)
log "replaying from the archive into a fresh database"
FROM_ARCHIVE=$(replay_rate callcap_bench_replay_archive --from-archive --since 2000-01-01T00:00:00Z)

TABLE="$OUT/archive.txt"
{
  echo "| measure | rate | same-run reference | ratio | cores |"
  echo "|---|---|---|---|---|"
  echo "| archive (records/s after the first object; $OBJ per object, $(python3 -c "print(round($BYTES / 1048576, 1))") MiB compressed in all) | $ARCH | stream read $READ msgs/s | $(python3 -c "print(f'{$ARCH / $READ:.2f}')") | $(nproc) |"
  echo "| replay --from-archive (rows/s) | $FROM_ARCHIVE | replay --from-seq 1: $FROM_STREAM rows/s | $(python3 -c "print(f'{$FROM_ARCHIVE / $FROM_STREAM:.2f}')") | $(nproc) |"
} > "$TABLE"
echo
cat "$TABLE"
