#!/usr/bin/env bash
# Gateway memory under the second probe's load: compressed batch bodies whose JSON costs
# far more to parse than their bytes (records whose call_details is {"a":[0,0,…]}), sent
# by CONC connections at once for SECONDS, from two keys. Samples the gateway's resident
# memory every 50 ms and reports its peak (VmHWM) and what it keeps 5 s after the load,
# against BODY_MEMORY_MB. Two loads: the probe's 255-record body (costs ~270 MB to parse:
# refused with 413 before it is parsed) and 24-record bodies (~25 MB each: read within
# the budget, 503 past it). Results in .run/bench/memory.txt (BENCHMARKS.md, "Memory").
#
# Settings: BODY_MEMORY_MB (256), BENCH_CONCURRENCY (16), BENCH_SECONDS (20),
# BENCH_BIN_DIR (target/release; target/debug measures the same allocations more slowly).
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/lib.sh
BUDGET=${BODY_MEMORY_MB:-256}
CONC=${BENCH_CONCURRENCY:-16}
SECS=${BENCH_SECONDS:-20}
B=${BENCH_BIN_DIR:-target/release}
OUT=.run/bench
mkdir -p "$OUT"
ensure_rust
ensure_nats_server
if [ "$B" = target/release ]; then
  log "building (release)"
  cargo build --release --quiet -p ingest-gateway
fi
ensure_nkeys "$PWD/.run/nkeys" "$B/ingest-gateway"
export NATS_NKEY_FILE="$CALLCAP_NKEY_DIR/admin.nk"
NATS_PORT=24432 GATEWAY_PORT=18093
export NATS_URL="nats://127.0.0.1:$NATS_PORT"
trap stop_started EXIT
start_nats single.conf "$NATS_PORT" 0 "$PWD/$OUT/js-memory" "$OUT/nats-memory.log"
start_gateway "$B" "$GATEWAY_PORT" "$OUT/gateway-memory.log" BODY_MEMORY_MB="$BUDGET"
GW_PID=$GATEWAY_PID
GW_URL="http://127.0.0.1:$GATEWAY_PORT"
C1=$(python3 -c 'import uuid; print(uuid.uuid4())'); C2=$(python3 -c 'import uuid; print(uuid.uuid4())')
K1=$(create_key "$B" "$C1" bench-memory-1 "$GW_URL")
K2=$(create_key "$B" "$C2" bench-memory-2 "$GW_URL")
python3 - "$GW_PID" "$GW_URL/v1/calls/batch" "$K1" "$C1" "$K2" "$C2" "$CONC" "$SECS" "$BUDGET" <<'PY' | tee "$OUT/memory.txt"
import collections, gzip, sys, threading, time, urllib.request, urllib.error
pid, url, k1, c1, k2, c2, conc, seconds, budget = sys.argv[1:]
conc, seconds = int(conc), float(seconds)

def rss(field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return 0.0

def body(company, records):
    zeros = "[" + "0," * 16_000 + "0]"
    record = '{"company_id":"%s","call_details":{"a":%s}}' % (company, zeros)
    return gzip.compress(('{"calls":[' + ",".join([record] * records) + "]}").encode(), 6)

def load(name, records):
    bodies = {k1: body(c1, records), k2: body(c2, records)}
    statuses = collections.Counter()
    stop = time.time() + seconds
    peak = [rss("VmRSS")]
    def sender(i):
        key = k1 if i % 2 == 0 else k2
        while time.time() < stop:
            req = urllib.request.Request(url, data=bodies[key], method="POST", headers={
                "x-api-key": key, "content-type": "application/json", "content-encoding": "gzip"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    statuses[r.status] += 1
            except urllib.error.HTTPError as e:
                statuses[e.code] += 1
                if e.code == 503:
                    time.sleep(0.05)
    threads = [threading.Thread(target=sender, args=(i,)) for i in range(conc)]
    before = rss("VmRSS")
    for t in threads: t.start()
    while any(t.is_alive() for t in threads):
        peak.append(rss("VmRSS")); time.sleep(0.05)
    time.sleep(5)
    after = rss("VmRSS")
    wire = len(bodies[k1])
    print(f"{name}: {records} records/body, {wire} bytes gzip on the wire, {conc} connections x {seconds:.0f} s, "
          f"BODY_MEMORY_MB={budget}: RSS before {before:.0f} MiB, peak {max(peak):.0f} MiB, 5 s after {after:.0f} MiB; "
          f"answers {dict(sorted(statuses.items()))}")

load("probe body", 255)
load("fitting body", 24)
print(f"gateway VmHWM (peak resident over both loads): {rss('VmHWM'):.0f} MiB")
PY
