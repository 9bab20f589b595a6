#!/usr/bin/env bash
# Brings the whole pipeline up on this machine: finds or installs nats-server 2.15+ and
# PostgreSQL, builds, starts a JetStream server, migrates, starts ingest-gateway and
# persist-worker in the background, creates a demo API key and prints a curl that works.
# Logs and pids go to .run/; `deploy/down.sh` stops everything.
#
# Settings (environment): GATEWAY_PORT (8080), NATS_PORT (14222; the machine's own
# nats-server may hold 4222), NATS_MONITOR_PORT (18222), METRICS_PORT (9091),
# DATABASE_URL (the local server; the pipeline uses database "callcap" on it).
# nats-server runs deploy/nats/single.conf: `sync_interval: always`, so a 201 survives a
# power loss of this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/lib.sh
GATEWAY_PORT=${GATEWAY_PORT:-8080}
NATS_PORT=${NATS_PORT:-14222}
NATS_MONITOR_PORT=${NATS_MONITOR_PORT:-18222}
METRICS_PORT=${METRICS_PORT:-9091}
RUN=.run
mkdir -p "$RUN"

[ -f "$RUN/gateway.pid" ] && bash deploy/down.sh >/dev/null 2>&1 || true

ensure_rust
ensure_nats_server
ensure_postgres
PIPELINE_DB_URL=$(with_database "$DATABASE_URL" callcap)

log "building (release)"
cargo build --release --quiet -p ingest-gateway -p persist-worker
BIN=target/release

log "starting nats-server $("$NATS_SERVER_BIN" --version | sed 's/.* //') on 127.0.0.1:$NATS_PORT"
mkdir -p "$RUN/jetstream"
nohup "$NATS_SERVER_BIN" -c deploy/nats/single.conf -a 127.0.0.1 -p "$NATS_PORT" -m "$NATS_MONITOR_PORT" \
  -sd "$PWD/$RUN/jetstream" > "$RUN/nats.log" 2>&1 &
echo $! > "$RUN/nats.pid"

export NATS_URL="nats://127.0.0.1:$NATS_PORT"
export NATS_MONITOR_URL="http://127.0.0.1:$NATS_MONITOR_PORT"
export DATABASE_URL="$PIPELINE_DB_URL"
export LISTEN_ADDR="127.0.0.1:$GATEWAY_PORT"
export METRICS_ADDR="127.0.0.1:$METRICS_PORT"

log "migrating $DATABASE_URL"
"$BIN/persist-worker" migrate >&2

log "starting ingest-gateway on $LISTEN_ADDR and persist-worker (metrics on $METRICS_ADDR)"
nohup "$BIN/ingest-gateway" > "$RUN/gateway.log" 2>&1 &
echo $! > "$RUN/gateway.pid"
nohup "$BIN/persist-worker" > "$RUN/worker.log" 2>&1 &
echo $! > "$RUN/worker.pid"

for _ in $(seq 1 60); do
  curl -fsS "http://$LISTEN_ADDR/readyz" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -fsS "http://$LISTEN_ADDR/readyz" >/dev/null || die "gateway not ready; see $RUN/gateway.log"

COMPANY=$(cat "$RUN/demo_company" 2>/dev/null || python3 -c 'import uuid; print(uuid.uuid4())')
echo "$COMPANY" > "$RUN/demo_company"
KEY=$("$BIN/ingest-gateway" keys create --company "$COMPANY" --name "demo key" | tail -n1)
echo "$KEY" > "$RUN/demo_key"
sleep 1 # the new key reaches the gateway through its KV watch

cat <<MSG

Call Capture is up.
  gateway   http://$LISTEN_ADDR   (logs: $RUN/gateway.log)
  worker    metrics http://$METRICS_ADDR/metrics   (logs: $RUN/worker.log)
  NATS      $NATS_URL   Postgres  $DATABASE_URL
  demo company $COMPANY, key in $RUN/demo_key

Send a call record:

curl -sS -X POST http://$LISTEN_ADDR/functions/v1/webhook-call-capture \\
  -H "Content-Type: application/json" \\
  -H "x-api-key: $KEY" \\
  -d '{"company_id": "$COMPANY", "caller_number": "+919876543210", "recipient_number": "+919123456789", "duration_seconds": 180, "outcome": "follow_up", "notes": "Customer interested in service", "external_call_id": "CALL-12345"}'

Then see it stored:

psql "$DATABASE_URL" -c "select id, outcome, notes, stored_at from call_history order by stored_at desc limit 5"

Stop everything with: bash deploy/down.sh
MSG
