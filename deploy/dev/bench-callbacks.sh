#!/usr/bin/env bash
# Provider callbacks next to the API they stand in for: the same completed calls posted
# to one gateway as single records with an API key (`/v1/calls`, the ceiling) and as
# Twilio status callbacks (form body, X-Twilio-Signature checked, mapped to the record),
# alternating, each request distinct and prepared before the clock starts. No worker:
# this measures the gateway (a 2xx means JetStream has the record). Takes ~2 minutes.
# Results on stdout and in .run/bench/callbacks.txt (BENCHMARKS.md, "Provider callbacks").
#
# Settings: BENCH_REQUESTS (20000) per run; BENCH_CONCURRENCY (32); BENCH_ROUNDS (3).
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/lib.sh
REQUESTS=${BENCH_REQUESTS:-20000}
CONC=${BENCH_CONCURRENCY:-32}
ROUNDS=${BENCH_ROUNDS:-3}
OUT=.run/bench
mkdir -p "$OUT"
bench_prepare
NATS_PORT=24422 GATEWAY_PORT=18281
export NATS_URL="nats://127.0.0.1:$NATS_PORT"
GW_URL="http://127.0.0.1:$GATEWAY_PORT"
trap stop_started EXIT

start_nats single.conf "$NATS_PORT" 0 "$PWD/$OUT/js-callbacks" "$OUT/nats-callbacks.log"
export CONNECTOR_SECRETS_KEY_FILE="$PWD/$OUT/connector-secrets.key"
rm -f "$CONNECTOR_SECRETS_KEY_FILE"
"$B/ingest-gateway" connectors new-secrets-key --out "$CONNECTOR_SECRETS_KEY_FILE" >/dev/null
start_gateway "$B" "$GATEWAY_PORT" "$OUT/gateway-callbacks.log" CONNECTOR_SECRETS_KEY_FILE="$CONNECTOR_SECRETS_KEY_FILE"
COMPANY=$(python3 -c 'import uuid; print(uuid.uuid4())')
KEY=$(create_key "$B" "$COMPANY" bench "$GW_URL")
TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
echo "$TOKEN" > "$OUT/twilio.token"
PUBLIC=https://calls.example.test
URL=$("$B/ingest-gateway" connectors create --company "$COMPANY" --provider twilio \
  --public-url "$PUBLIC" --secret-file "$OUT/twilio.token" | tail -n1)
wait_connector "$URL" "$GW_URL" # it reaches the gateway through its KV watch

TABLE="$OUT/callbacks.txt"
{
  echo "| round | api /v1/calls req/s | twilio callbacks req/s | ratio | api p50 / p99 ms | twilio p50 / p99 ms | failed | cores |"
  echo "|---|---|---|---|---|---|---|---|"
} > "$TABLE"
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p"; }
for R in $(seq 1 "$ROUNDS"); do
  log "round $R: $REQUESTS requests each, $CONC clients"
  API=$("$B/callcap-bench" callbacks --gateway "$GW_URL" --mode api --key "$KEY" --company "$COMPANY" \
    --requests "$REQUESTS" --concurrency "$CONC")
  TW=$("$B/callcap-bench" callbacks --gateway "$GW_URL" --mode twilio --company "$COMPANY" \
    --callback-url "$URL" --public-url "$PUBLIC" --token "$TOKEN" --requests "$REQUESTS" --concurrency "$CONC")
  A=$(echo "$API" | field per_sec); T=$(echo "$TW" | field per_sec)
  RATIO=$(python3 -c "print(f'{$T/$A:.2f}')")
  FAILED=$(( $(echo "$API" | field failed) + $(echo "$TW" | field failed) ))
  echo "| $R | $A | $T | $RATIO | $(echo "$API" | field p50_ms) / $(echo "$API" | field p99_ms) | $(echo "$TW" | field p50_ms) / $(echo "$TW" | field p99_ms) | $FAILED | $(nproc) |" >> "$TABLE"
done
cat "$TABLE"
