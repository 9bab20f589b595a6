#!/usr/bin/env bash
# Reproduces BENCHMARKS.md: every figure next to its ceiling, measured in one run on this
# machine, everything on loopback. Takes about 15 minutes. Results: .run/bench/*.txt and a
# summary on stdout.
#
# Settings: BENCH_SECONDS (10) per wrk run; BENCH_ROWS (100000) for the worker figures.
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/lib.sh
ulimit -n 65536 2>/dev/null || true
SECS=${BENCH_SECONDS:-10}
ROWS=${BENCH_ROWS:-100000}
OUT=.run/bench
mkdir -p "$OUT"
if ! command -v wrk >/dev/null; then
  log "installing wrk"
  apt-get update -qq && apt-get install -y -qq wrk >/dev/null
fi
bench_prepare
NATS_PORT=24222 NATS_MONITOR_PORT=24223 GATEWAY_PORT=18081 CEILING_PORT=18080
export NATS_URL="nats://127.0.0.1:$NATS_PORT"
BENCH_DB_URL=$(with_database "$DATABASE_URL" callcap_bench)
GW_URL="http://127.0.0.1:$GATEWAY_PORT"
trap stop_started EXIT

# $1: a config file under deploy/nats/ (single.conf is what the project runs).
bench_nats() { start_nats "$1" "$NATS_PORT" "$NATS_MONITOR_PORT" "$PWD/$OUT/js" "$OUT/nats.log"; }
stop_nats() { kill "$NATS_PID" 2>/dev/null; wait "$NATS_PID" 2>/dev/null || true; }
bench_gateway() {
  start_gateway "$B" "$GATEWAY_PORT" "$OUT/gateway.log" NATS_MONITOR_URL="http://127.0.0.1:$NATS_MONITOR_PORT"
  GW_PID=$GATEWAY_PID
}
stop_gateway() { kill "$GW_PID" 2>/dev/null; wait "$GW_PID" 2>/dev/null || true; }
peak_rss_mb() { awk '/VmHWM/ {printf "%.0f", $2/1024}' "/proc/$1/status"; }

wrk_run() { # name url connections body-file
  local name=$1 url=$2 conns=$3 body=$4
  RUN="$name-$RANDOM" BENCH_BODY="$body" KEY="$KEY" \
    wrk -t"$(( conns < 2 ? 1 : 2 ))" -c"$conns" -d"${SECS}s" --latency -s deploy/dev/post.lua "$url" > "$OUT/$name.txt" 2>&1 || true
  local rps p50 p99 non2xx
  rps=$(awk '/Requests\/sec/ {print $2}' "$OUT/$name.txt")
  p50=$(awk '$1=="50%" {print $2}' "$OUT/$name.txt")
  p99=$(awk '$1=="99%" {print $2}' "$OUT/$name.txt")
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$OUT/$name.txt")
  printf '%-28s conns=%-5s req/s=%-10s p50=%-9s p99=%-9s non2xx=%s\n' "$name" "$conns" "$rps" "$p50" "$p99" "${non2xx:-0}" | tee -a "$OUT/summary.txt"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rps" "$p50" "$p99" >> "$OUT/results.tsv"
}

: > "$OUT/summary.txt"; : > "$OUT/results.tsv"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r); nats-server $("$NATS_SERVER_BIN" --version | sed 's/.* //'); $(psql "$DATABASE_URL" -tAc 'select version()' | cut -d' ' -f1-2)" | tee -a "$OUT/summary.txt"
COMPANY=$(python3 -c 'import uuid; print(uuid.uuid4())')
"$B/callcap-bench" body --company "$COMPANY" > "$OUT/one.json"
"$B/callcap-bench" body --company "$COMPANY" --records 100 > "$OUT/batch100.json"
"$B/callcap-bench" body --company "$COMPANY" --records 1000 > "$OUT/batch1000.json"

# The fsync floor: what one power-loss-safe ack cannot go below on this disk.
"$B/callcap-bench" fsync --dir "$OUT" | tee -a "$OUT/summary.txt"
for CONF in interval-fsync single; do
  case $CONF in single) SYNC=strict ;; *) SYNC=interval ;; esac
  log "JetStream: deploy/nats/$CONF.conf ($SYNC fsync)"
  echo "--- jetstream: deploy/nats/$CONF.conf ($SYNC fsync)" | tee -a "$OUT/summary.txt"
  bench_nats "$CONF.conf"
  "$B/callcap-bench" broker --count 50000 --in-flight 512 | sed "s/^/$SYNC one-per-publish /" | tee -a "$OUT/summary.txt"
  stop_nats; bench_nats "$CONF.conf"
  "$B/callcap-bench" broker --count 50000 --in-flight 2 --atomic-batch 1000 | sed "s/^/$SYNC atomic-batches /" | tee -a "$OUT/summary.txt"
  stop_nats; bench_nats "$CONF.conf"
  # 256 connections can form batches of about 128 with 2 in flight: the broker's rate at
  # that size bounds the single-POST figure below.
  "$B/callcap-bench" broker --count 30000 --in-flight 2 --atomic-batch 128 | sed "s/^/$SYNC atomic-batches-128 /" | tee -a "$OUT/summary.txt"
  stop_nats; bench_nats "$CONF.conf"
  bench_gateway
  KEY=$(create_key "$B" "$COMPANY" bench "$GW_URL")
  for C in 1 64 256; do
    wrk_run "gateway-$SYNC-c$C" "$GW_URL/v1/calls" "$C" "$OUT/one.json"
  done
  echo "gateway peak RSS after load: $(peak_rss_mb "$GW_PID") MiB" | tee -a "$OUT/summary.txt"
  wrk_run "batch100-$SYNC" "$GW_URL/v1/calls/batch" 32 "$OUT/batch100.json"
  # 4 x 1000 records stay under MAX_IN_FLIGHT_PUBLISHES (8192); more would measure 503s.
  wrk_run "batch1000-$SYNC" "$GW_URL/v1/calls/batch" 4 "$OUT/batch1000.json"
  curl -fsS "$GW_URL/readyz" | sed "s/^/$SYNC readyz: /" | tee -a "$OUT/summary.txt"; echo | tee -a "$OUT/summary.txt"
  if [ "$SYNC" = strict ]; then
    wrk_run "gateway-overload-c2560" "$GW_URL/v1/calls" 2560 "$OUT/one.json"
    echo "gateway peak RSS after 10x overload: $(peak_rss_mb "$GW_PID") MiB" | tee -a "$OUT/summary.txt"
  fi
  stop_gateway
  stop_nats
done

# The machine is shared and noisy: a single strict-vs-interval pair can swing +-20%.
# Three alternating rounds of the single-POST load at 256 connections, each on a fresh
# server and gateway; the summary reports the median ratio.
log "paired rounds: single POST, 256 connections, strict vs interval"
echo "--- paired rounds (alternating, fresh server each)" | tee -a "$OUT/summary.txt"
for ROUND in 1 2 3; do
  for CONF in interval-fsync single; do
    case $CONF in single) SYNC=strict ;; *) SYNC=interval ;; esac
    bench_nats "$CONF.conf"; bench_gateway
    KEY=$(create_key "$B" "$COMPANY" bench "$GW_URL")
    wrk_run "paired$ROUND-$SYNC-c256" "$GW_URL/v1/calls" 256 "$OUT/one.json"
    stop_gateway; stop_nats
  done
done

log "HTTP ceiling"
echo "--- ceilings" | tee -a "$OUT/summary.txt"
start_bg /dev/null "$B/callcap-bench" http-ceiling --listen "127.0.0.1:$CEILING_PORT"
CEIL_PID=$LAST_PID
wait_tcp "$CEILING_PORT" 5 || die "the HTTP ceiling did not start"
for C in 64 256; do
  KEY=x wrk_run "http-ceiling-c$C" "http://127.0.0.1:$CEILING_PORT/v1/calls" "$C" "$OUT/one.json"
done
kill "$CEIL_PID"

log "worker vs database ceiling ($ROWS rows)"
echo "--- worker" | tee -a "$OUT/summary.txt"
psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS callcap_bench WITH (FORCE)"
DATABASE_URL="$BENCH_DB_URL" "$B/persist-worker" migrate >/dev/null
bench_nats single.conf
"$B/callcap-bench" db-ceiling --database-url "$BENCH_DB_URL" --count "$ROWS" | tee -a "$OUT/summary.txt"
"$B/callcap-bench" db-ceiling --copy --database-url "$BENCH_DB_URL" --count "$ROWS" | tee -a "$OUT/summary.txt"
"$B/callcap-bench" broker --count "$ROWS" --in-flight 2 --atomic-batch 1000 > /dev/null
"$B/callcap-bench" worker --database-url "$BENCH_DB_URL" --count "$ROWS" | tee -a "$OUT/summary.txt"

log "end to end"
echo "--- end to end" | tee -a "$OUT/summary.txt"
psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS callcap_bench WITH (FORCE)"
DATABASE_URL="$BENCH_DB_URL" "$B/persist-worker" migrate >/dev/null
stop_nats; bench_nats single.conf
bench_gateway
KEY=$(create_key "$B" "$COMPANY" bench "$GW_URL")
# The gateway alone, driven by the same client as the end-to-end figure.
"$B/callcap-bench" e2e --gateway "$GW_URL" --key "$KEY" --company "$COMPANY" \
  --database-url "$BENCH_DB_URL" --seconds "$SECS" --concurrency 128 --post-only | tee -a "$OUT/summary.txt"
stop_gateway; stop_nats; bench_nats single.conf; bench_gateway
start_worker "$B" 19091 "$BENCH_DB_URL" "$OUT/worker.log"
KEY=$(create_key "$B" "$COMPANY" bench "$GW_URL")
"$B/callcap-bench" e2e --gateway "$GW_URL" --key "$KEY" --company "$COMPANY" \
  --database-url "$BENCH_DB_URL" --seconds "$SECS" --concurrency 128 | tee -a "$OUT/summary.txt"
psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS callcap_bench WITH (FORCE)"

# Group commit against its targets, from this run's figures.
echo "--- group commit: strict (sync_interval always) vs interval fsync, same run" | tee -a "$OUT/summary.txt"
python3 - "$OUT/results.tsv" "$OUT/summary.txt" <<'PY' | tee -a "$OUT/summary.txt"
import sys, re
rows = {l.split("\t")[0]: l.rstrip("\n").split("\t")[1:] for l in open(sys.argv[1]) if l.strip()}
def ms(v):
    m = re.match(r"([0-9.]+)(us|ms|s)", v or "")
    return float(m.group(1)) * {"us": 1e-3, "ms": 1, "s": 1e3}[m.group(2)] if m else float("nan")
summary = open(sys.argv[2]).read()
fs = re.search(r"fsync count=\d+ p50_ms=([0-9.]+)", summary)
for name, what in [("gateway-{}-c256", "single POST, 256 conns"), ("gateway-{}-c64", "single POST, 64 conns"),
                   ("batch100-{}", "batch endpoint, 100/request (records/s = req/s x 100)"),
                   ("batch1000-{}", "batch endpoint, 1000/request")]:
    s, i = rows.get(name.format("strict")), rows.get(name.format("interval"))
    if s and i:
        print(f"{what}: strict {float(s[0]):.0f} req/s (p99 {s[2]}) / interval {float(i[0]):.0f} req/s = {float(s[0])/float(i[0]):.2f}")
ratios = sorted(float(rows[f"paired{r}-strict-c256"][0]) / float(rows[f"paired{r}-interval-c256"][0])
                for r in (1, 2, 3) if f"paired{r}-strict-c256" in rows and f"paired{r}-interval-c256" in rows)
if ratios:
    print("single POST, 256 conns, paired rounds: strict/interval ratios " + ", ".join(f"{x:.2f}" for x in ratios)
          + f"; median {ratios[len(ratios) // 2]:.2f}")
c1 = rows.get("gateway-strict-c1")
if c1 and fs:
    print(f"1 connection: strict p50 {ms(c1[1]):.3f} ms vs one fsync ({fs.group(1)} ms) + 1 ms = {float(fs.group(1)) + 1:.3f} ms")
PY

# Every stage next to its ceiling, measured in this run.
echo "--- every stage against its ceiling (this run)" | tee -a "$OUT/summary.txt"
python3 - "$OUT/results.tsv" "$OUT/summary.txt" <<'PY' | tee -a "$OUT/summary.txt"
import sys, re
rows = {l.split("\t")[0]: l.rstrip("\n").split("\t")[1:] for l in open(sys.argv[1]) if l.strip()}
summary = open(sys.argv[2]).read()
def field(prefix, key):
    m = re.search(rf"^{prefix} .*?\b{key}=([0-9.]+)", summary, re.M)
    return float(m.group(1)) if m else None
def rps(name):
    return float(rows[name][0]) if name in rows else None
table = []
worker, unnest, copy = field("worker", "rows_per_sec"), field("db_ceiling", "rows_per_sec"), field("db_ceiling_copy", "rows_per_sec")
if worker and unnest and copy:
    best = max(unnest, copy)
    table.append(("worker, rows/s from a filled stream", f"{worker:.0f}",
                  f"{best:.0f} (INSERT…UNNEST {unnest:.0f}; COPY+INSERT…SELECT {copy:.0f})", worker / best, "≥ 0.8"))
gw, ceil = rps("gateway-strict-c256"), rps("http-ceiling-c256")
broker128 = field("strict atomic-batches-128 broker", "msgs_per_sec")
if gw and ceil:
    table.append(("gateway, single POST req/s at 256 conns (strict fsync)", f"{gw:.0f}, p99 {rows['gateway-strict-c256'][2]}",
                  f"{ceil:.0f}, p99 {rows['http-ceiling-c256'][2]} (bare axum handler)", gw / ceil, "≥ 0.5, p99 ≤ 10 ms"))
if gw and broker128:
    table.append(("  same figure against the broker", f"{gw:.0f}",
                  f"{broker128:.0f} (JetStream alone, atomic batches of 128, 2 in flight)", gw / broker128, ""))
post, e2e = field("e2e_post_only", "records_per_sec"), field("e2e", "records_per_sec")
lag = field("e2e", "lag_p99_ms")
if post and e2e and worker:
    slower = min(post, worker)
    table.append(("end to end, records/s POST → row (128 clients)", f"{e2e:.0f}, lag p99 {lag} ms",
                  f"{slower:.0f} (slower of gateway alone {post:.0f}, worker alone {worker:.0f})", e2e / slower, "≥ 0.8, lag p99 ≤ 100 ms"))
print(f"| {'stage':<55} | {'figure':<22} | {'ceiling (same run)':<60} | ratio | target |")
for what, fig, c, r, target in table:
    print(f"| {what:<55} | {fig:<22} | {c:<60} | {r:5.2f} | {target} |")
PY
log "done: $OUT/summary.txt"
