#!/usr/bin/env bash
# Compressed request bodies: the batch endpoint's records/s and latency with plain, gzip
# and zstd bodies, and the bytes each record costs on the wire. One nats-server
# (single.conf: fsync before every ack) and one gateway; bodies of Example 2 records, all
# distinct, prepared and compressed by callcap-bench before its clock starts. Encodings
# alternate over ROUNDS rounds (the machine is shared and noisy); the summary gives each
# round's figures and the median ratio to plain. Results in .run/bench/encoding.txt
# (BENCHMARKS.md, "Compressed bodies").
#
# Settings: BENCH_BATCHES (600 batches per run), BENCH_RECORDS (100 per batch),
# BENCH_CONCURRENCY (8), ROUNDS (3).
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/lib.sh
BATCHES=${BENCH_BATCHES:-600}
RECORDS=${BENCH_RECORDS:-100}
CONC=${BENCH_CONCURRENCY:-8}
ROUNDS=${ROUNDS:-3}
OUT=.run/bench
mkdir -p "$OUT"
ensure_rust
ensure_nats_server
log "building (release)"
cargo build --release --quiet -p ingest-gateway
cargo build --release --quiet -p callcap-tests --bin callcap-bench
# The broker admits only the pipeline's NATS identities (SECURITY.md).
ensure_nkeys "$PWD/.run/nkeys" target/release/ingest-gateway
export NATS_NKEY_FILE="$CALLCAP_NKEY_DIR/admin.nk"
B=target/release
NATS_PORT=24422 GATEWAY_PORT=18091
export NATS_URL="nats://127.0.0.1:$NATS_PORT"
trap stop_started EXIT
start_nats single.conf "$NATS_PORT" 0 "$PWD/$OUT/js-encoding" "$OUT/nats-encoding.log"
start_gateway "$B" "$GATEWAY_PORT" "$OUT/gateway-encoding.log"
COMPANY=$(python3 -c 'import uuid; print(uuid.uuid4())')
KEY=$(create_key "$B" "$COMPANY" bench "http://127.0.0.1:$GATEWAY_PORT")

SUMMARY="$OUT/encoding.txt"
echo "machine: $(nproc) cores, $(uname -r); nats-server $("$NATS_SERVER_BIN" --version | sed 's/.* //'); batches of $RECORDS records, $CONC connections, $BATCHES batches per run" | tee "$SUMMARY"
for ROUND in $(seq 1 "$ROUNDS"); do
  for ENC in plain gzip zstd; do
    line=$("$B/callcap-bench" encoded --gateway "http://127.0.0.1:$GATEWAY_PORT" --key "$KEY" --company "$COMPANY" \
      --encoding "$ENC" --records "$RECORDS" --batches "$BATCHES" --concurrency "$CONC")
    echo "round=$ROUND $line" | tee -a "$SUMMARY"
  done
done
python3 - "$SUMMARY" <<'PY' | tee -a "$SUMMARY"
import re, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    m = dict(re.findall(r"(\w+)=([\w.]+)", line))
    if "encoding" in m:
        runs.setdefault(m["round"], {})[m["encoding"]] = m
for enc in ("gzip", "zstd"):
    ratios = [float(r[enc]["records_per_sec"]) / float(r["plain"]["records_per_sec"]) for r in runs.values()]
    wire = statistics.median(float(r[enc]["wire_bytes_per_record"]) for r in runs.values())
    plain = statistics.median(float(r["plain"]["wire_bytes_per_record"]) for r in runs.values())
    print(f"{enc}: median records/s ratio to plain {statistics.median(ratios):.2f} "
          f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)}); {wire:.0f} bytes/record on the wire vs {plain:.0f} plain ({wire / plain:.3f})")
PY
