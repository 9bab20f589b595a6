#!/usr/bin/env bash
# Gateway memory under the second probe's load: compressed batch bodies whose JSON costs
# far more to parse than their bytes (records whose call_details is {"a":[0,0,…]}), sent
# by CONC connections at once for SECONDS, from two keys. Samples the gateway's resident
# memory every 50 ms and reports its peak (VmHWM) and what it keeps 5 s after the load,
# against BODY_MEMORY_MB. Three loads: the probe's 255-record body (costs ~270 MB to
# parse: refused with 413 before it is parsed), 24-record bodies (~25 MB each: read within
# the budget, 503 past it), and the third probe's: the 255-record body as zstd (~1 KB on
# the wire) sent by wrk (16 threads, twice as many connections: Python's threads do not
# keep that many requests in the gateway at once), where the decoder's own window and
# the buffer's growth used to go uncounted. Results in .run/bench/memory.txt
# (BENCHMARKS.md, "Memory").
#
# Settings: BODY_MEMORY_MB (256), BENCH_CONCURRENCY (16), BENCH_SECONDS (20),
# BENCH_WORKER_THREADS (the gateway's Tokio threads, 16),
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
command -v zstd >/dev/null || apt_install zstd
command -v wrk >/dev/null || apt_install wrk
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
# As many worker threads as the probe's host had cores: on 2 cores, two bodies are
# decoded at a time and the rest wait with small buffers, which hides what many decoding
# at once hold (BENCH_WORKER_THREADS).
start_gateway "$B" "$GATEWAY_PORT" "$OUT/gateway-memory.log" BODY_MEMORY_MB="$BUDGET" \
  TOKIO_WORKER_THREADS="${BENCH_WORKER_THREADS:-16}" ${BENCH_GATEWAY_ENV:-}
GW_PID=$GATEWAY_PID
GW_URL="http://127.0.0.1:$GATEWAY_PORT"
C1=$(python3 -c 'import uuid; print(uuid.uuid4())'); C2=$(python3 -c 'import uuid; print(uuid.uuid4())')
K1=$(create_key "$B" "$C1" bench-memory-1 "$GW_URL")
K2=$(create_key "$B" "$C2" bench-memory-2 "$GW_URL")
python3 - "$GW_PID" "$GW_URL/v1/calls/batch" "$K1" "$C1" "$K2" "$C2" "$CONC" "$SECS" "$BUDGET" <<'PY' | tee "$OUT/memory.txt"
import collections, gzip, os, subprocess, sys, tempfile, threading, time, urllib.request, urllib.error
pid, url, k1, c1, k2, c2, conc, seconds, budget = sys.argv[1:]
conc, seconds = int(conc), float(seconds)

def rss(field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return 0.0

def body(company, records, encoding):
    zeros = "[" + "0," * 16_000 + "0]"
    record = '{"company_id":"%s","call_details":{"a":%s}}' % (company, zeros)
    text = ('{"calls":[' + ",".join([record] * records) + "]}").encode()
    if encoding == "zstd":
        # The CLI writes the content size; a streaming client would not (more decoder
        # memory, counted the same way).
        return subprocess.run(["zstd", "-q", "-3", "-c"], input=text, capture_output=True, check=True).stdout
    return gzip.compress(text, 6)

def load(name, records, encoding="gzip", conc=conc):
    bodies = {k1: body(c1, records, encoding), k2: body(c2, records, encoding)}
    statuses = collections.Counter()
    stop = time.time() + seconds
    peak = [rss("VmRSS")]
    def sender(i):
        key = k1 if i % 2 == 0 else k2
        while time.time() < stop:
            req = urllib.request.Request(url, data=bodies[key], method="POST", headers={
                "x-api-key": key, "content-type": "application/json", "content-encoding": encoding})
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
    print(f"{name}: {records} records/body, {wire} bytes {encoding} on the wire, {conc} connections x {seconds:.0f} s, "
          f"BODY_MEMORY_MB={budget}: RSS before {before:.0f} MiB, peak {max(peak):.0f} MiB, 5 s after {after:.0f} MiB; "
          f"answers {dict(sorted(statuses.items()))}")

def load_wrk(name, records, encoding, conc):
    wire = body(c1, records, encoding)
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(wire)
    before = rss("VmRSS")
    peak = [before]
    env = dict(os.environ, BENCH_BODY=f.name, ENCODING=encoding, KEY=k1)
    run = subprocess.Popen(["wrk", "-t16", f"-c{conc}", f"-d{int(seconds)}s", "--timeout", "60s",
                            "-s", "deploy/dev/post-encoded.lua", url], env=env,
                           stdout=subprocess.PIPE, text=True)
    while run.poll() is None:
        peak.append(rss("VmRSS")); time.sleep(0.05)
    answers = [l for l in run.stdout.read().splitlines() if l.startswith("answers")]
    time.sleep(5)
    after = rss("VmRSS")
    print(f"{name}: {records} records/body, {len(wire)} bytes {encoding} on the wire, wrk 16 threads x {conc} connections x {seconds:.0f} s, "
          f"BODY_MEMORY_MB={budget}: RSS before {before:.0f} MiB, peak {max(peak):.0f} MiB, 5 s after {after:.0f} MiB; "
          f"{answers[0] if answers else 'no answers counted'}")
    os.unlink(f.name)

load("probe body", 255)
load("fitting body", 24)
load_wrk("probe body, zstd", 255, "zstd", 2 * conc)
print(f"gateway VmHWM (peak resident over all loads): {rss('VmHWM'):.0f} MiB")
PY
