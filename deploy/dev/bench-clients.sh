#!/usr/bin/env bash
# The clients (clients/python, clients/node): records/s through each against single POSTs
# by the same number of concurrent senders, and the spool's cost (memory queue vs spool
# fsync per append vs per batch), on a pipeline of this commit's release build. Results
# on stdout and in .run/bench/clients.txt (BENCHMARKS.md, "Clients").
#
# Settings: BENCH_RECORDS (20000) per mode, BENCH_SENDERS (8).
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/lib.sh
OUT=.run/bench
mkdir -p "$OUT"
bench_prepare
ensure_node
ensure_pytest
export CALLCAP_BIN_DIR="$PWD/$B"
{
  python3 clients/testing/bench.py
  echo
  node clients/testing/bench.mjs
} | tee "$OUT/clients.txt"
