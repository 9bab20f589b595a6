#!/usr/bin/env bash
# Brings the whole pipeline up on this machine: finds or installs nats-server 2.15+ and
# PostgreSQL, builds, starts a JetStream server, migrates, starts ingest-gateway and
# persist-worker in the background, creates a demo API key and prints a curl that works.
# Logs and pids go to .run/; `deploy/down.sh` stops everything.
#
# Settings (environment): GATEWAY_PORT (8080), NATS_PORT (14222; the machine's own
# nats-server may hold 4222), NATS_MONITOR_PORT (18222), METRICS_PORT (9091),
# DATABASE_URL (the local server; the pipeline uses database "callcap" on it),
# S3_PORT (18333; the archive's S3-compatible store, SeaweedFS, whose other ports are
# S3_PORT+1000..+1002 and each port's gRPC twin +10000), ARCHIVER_METRICS_PORT (9093).
# nats-server runs deploy/nats/single.conf: `sync_interval: always`, so a 201 survives a
# power loss of this machine. The broker only admits the pipeline's three NATS identities
# (nkeys created once under .run/nkeys/: gateway, worker, admin; see SECURITY.md).
#
# CLUSTER=3 brings up the clustered pipeline instead, to try failover on one machine:
# three nats-servers on loopback (deploy/nats/cluster.conf; client ports NATS_PORT..+2,
# monitoring NATS_MONITOR_PORT..+2, routes CLUSTER_PORT..+2, default 16222), an R3
# stream, consumer and key bucket, two gateways (GATEWAY_PORT, +1) and two workers
# (metrics on METRICS_PORT, +1), every process given all three servers in NATS_URL.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/lib.sh
GATEWAY_PORT=${GATEWAY_PORT:-8080}
NATS_PORT=${NATS_PORT:-14222}
NATS_MONITOR_PORT=${NATS_MONITOR_PORT:-18222}
METRICS_PORT=${METRICS_PORT:-9091}
CLUSTER=${CLUSTER:-1}
CLUSTER_PORT=${CLUSTER_PORT:-16222}
case "$CLUSTER" in
  1) NODES=1 ;;
  3) NODES=3 ;;
  *) die "CLUSTER=$CLUSTER: use 3 (a 3-node JetStream cluster) or leave it unset (one server)" ;;
esac
RUN=.run
mkdir -p "$RUN"

ls "$RUN"/*.pid >/dev/null 2>&1 && bash deploy/down.sh >/dev/null 2>&1 || true

ensure_rust
ensure_nats_server
ensure_postgres
ensure_seaweedfs
PIPELINE_DB_URL=$(with_database "$DATABASE_URL" callcap)

# The `local` profile (Cargo.toml): optimised like release, built in about half the time.
log "building (profile local)"
cargo build --profile local --quiet -p ingest-gateway -p persist-worker
BIN=target/local
NKEYS="$PWD/$RUN/nkeys"
ensure_nkeys "$NKEYS" "$BIN/ingest-gateway"
# The key that seals provider connectors' secrets (README, "Provider callbacks"): made
# once, given to every gateway and to the `connectors` commands.
export CONNECTOR_SECRETS_KEY_FILE="$PWD/$RUN/connector-secrets.key"
[ -s "$CONNECTOR_SECRETS_KEY_FILE" ] || "$BIN/ingest-gateway" connectors new-secrets-key --out "$CONNECTOR_SECRETS_KEY_FILE" >&2
# The key erased identifiers are hashed with (README, "Erasure and retention"): made once,
# for every worker and `persist-worker erase`.
export ERASURE_KEY_FILE="$PWD/$RUN/erasure.key"
if [ ! -s "$ERASURE_KEY_FILE" ]; then
  (umask 077; head -c 32 /dev/urandom | base64 > "$ERASURE_KEY_FILE")
fi

NATS_VERSION=$("$NATS_SERVER_BIN" --version | sed 's/.* //')
SEEDS=()
if [ "$NODES" -eq 1 ]; then
  log "starting nats-server $NATS_VERSION on 127.0.0.1:$NATS_PORT"
  mkdir -p "$RUN/jetstream"
  nohup "$NATS_SERVER_BIN" -c deploy/nats/single.conf -a 127.0.0.1 -p "$NATS_PORT" -m "$NATS_MONITOR_PORT" \
    -sd "$PWD/$RUN/jetstream" > "$RUN/nats.log" 2>&1 &
  echo $! > "$RUN/nats.pid"
  SEEDS=("nats://127.0.0.1:$NATS_PORT")
else
  log "starting a 3-node nats-server $NATS_VERSION cluster on 127.0.0.1:$NATS_PORT-$((NATS_PORT + 2))"
  for i in 1 2 3; do
    mkdir -p "$RUN/jetstream-n$i"
    CALLCAP_NODE="n$i" CALLCAP_CLUSTER_LISTEN="127.0.0.1:$((CLUSTER_PORT + i - 1))" \
      CALLCAP_ROUTE_1="nats://callcap-route:$CALLCAP_ROUTE_PASSWORD@127.0.0.1:$CLUSTER_PORT" \
      CALLCAP_ROUTE_2="nats://callcap-route:$CALLCAP_ROUTE_PASSWORD@127.0.0.1:$((CLUSTER_PORT + 1))" \
      CALLCAP_ROUTE_3="nats://callcap-route:$CALLCAP_ROUTE_PASSWORD@127.0.0.1:$((CLUSTER_PORT + 2))" \
      nohup "$NATS_SERVER_BIN" -c deploy/nats/cluster.conf -a 127.0.0.1 -p "$((NATS_PORT + i - 1))" \
      -m "$((NATS_MONITOR_PORT + i - 1))" -sd "$PWD/$RUN/jetstream-n$i" > "$RUN/nats-$i.log" 2>&1 &
    echo $! > "$RUN/nats-$i.pid"
    SEEDS+=("nats://127.0.0.1:$((NATS_PORT + i - 1))")
  done
  # R3 everywhere, said explicitly (unset would also give 3 on a new cluster).
  export STREAM_REPLICAS=3
fi

NATS_URL=$(IFS=,; echo "${SEEDS[*]}")
export NATS_URL
export NATS_MONITOR_URL="http://127.0.0.1:$NATS_MONITOR_PORT"
export DATABASE_URL="$PIPELINE_DB_URL"

log "migrating $DATABASE_URL"
"$BIN/persist-worker" migrate >&2

# The archive (README, "Archive"): a local S3-compatible store (SeaweedFS) and one
# archiver copying the stream into it.
S3_PORT=${S3_PORT:-18333}
ARCHIVER_METRICS_PORT=${ARCHIVER_METRICS_PORT:-9093}
log "starting SeaweedFS (S3 on 127.0.0.1:$S3_PORT) for the archive"
# Left running when this script exits (the pipeline stays up): its pid goes to a file.
start_s3 "$PWD/$RUN/s3" "$S3_PORT" callcap-archive "$RUN/s3.log"
echo "$S3_PID" > "$RUN/s3.pid"
export ARCHIVE_URL="s3://callcap-archive/calls"

GATEWAYS=()
for i in $(seq 1 $(( NODES == 1 ? 1 : 2 ))); do
  suffix=$([ "$NODES" -eq 1 ] && echo "" || echo "-$i")
  listen="127.0.0.1:$((GATEWAY_PORT + i - 1))"
  metrics="127.0.0.1:$((METRICS_PORT + i - 1))"
  log "starting ingest-gateway$suffix on $listen and persist-worker$suffix (metrics on $metrics)"
  NATS_NKEY_FILE="$NKEYS/gateway.nk" LISTEN_ADDR="$listen" nohup "$BIN/ingest-gateway" > "$RUN/gateway$suffix.log" 2>&1 &
  echo $! > "$RUN/gateway$suffix.pid"
  NATS_NKEY_FILE="$NKEYS/worker.nk" METRICS_ADDR="$metrics" nohup "$BIN/persist-worker" > "$RUN/worker$suffix.log" 2>&1 &
  echo $! > "$RUN/worker$suffix.pid"
  GATEWAYS+=("$listen")
done
log "starting persist-worker archive (metrics on 127.0.0.1:$ARCHIVER_METRICS_PORT) into $ARCHIVE_URL"
NATS_NKEY_FILE="$NKEYS/worker.nk" METRICS_ADDR="127.0.0.1:$ARCHIVER_METRICS_PORT" \
  nohup "$BIN/persist-worker" archive > "$RUN/archiver.log" 2>&1 &
echo $! > "$RUN/archiver.pid"
LISTEN_ADDR=${GATEWAYS[0]}
METRICS_ADDR="127.0.0.1:$METRICS_PORT"

for gw in "${GATEWAYS[@]}"; do
  wait_http "http://$gw/readyz" 60 || die "gateway on $gw not ready; see the logs in $RUN/"
done

COMPANY=$(cat "$RUN/demo_company" 2>/dev/null || python3 -c 'import uuid; print(uuid.uuid4())')
echo "$COMPANY" > "$RUN/demo_company"
KEY=$(NATS_NKEY_FILE="$NKEYS/admin.nk" "$BIN/ingest-gateway" keys create --company "$COMPANY" --name "demo key" | tail -n1)
echo "$KEY" > "$RUN/demo_key"
# The key reaches every gateway through its KV watch.
for gw in "${GATEWAYS[@]}"; do wait_key "$KEY" "http://$gw"; done

if [ "$NODES" -eq 1 ]; then
  SHAPE="  gateway   http://$LISTEN_ADDR   (logs: $RUN/gateway.log)
  worker    metrics http://$METRICS_ADDR/metrics   (logs: $RUN/worker.log)"
else
  SHAPE="  gateways  http://${GATEWAYS[0]}  http://${GATEWAYS[1]}   (logs: $RUN/gateway-*.log)
  workers   metrics http://127.0.0.1:$METRICS_PORT/metrics  http://127.0.0.1:$((METRICS_PORT + 1))/metrics
  cluster   3 nodes, monitoring http://127.0.0.1:$NATS_MONITOR_PORT/jsz (+1, +2); stream CALLS R3
            try: kill -9 \$(cat $RUN/nats-1.pid) while posting: the other two nodes carry on"
fi

cat <<MSG

Call Capture is up.
$SHAPE
  NATS      $NATS_URL
  Postgres  $DATABASE_URL
  demo company $COMPANY, key in $RUN/demo_key
  NATS identities  $NKEYS/{gateway,worker,admin}.nk (admin commands: NATS_NKEY_FILE=$NKEYS/admin.nk)
  connector secrets key  $CONNECTOR_SECRETS_KEY_FILE (provider callbacks: README, "Provider callbacks")
  erasure key  $ERASURE_KEY_FILE (persist-worker erase: README, "Erasure and retention")
  archive   $ARCHIVE_URL at $AWS_ENDPOINT_URL, archiver http://127.0.0.1:$ARCHIVER_METRICS_PORT/readyz (logs: $RUN/archiver.log)

Send a call record:

curl -sS -X POST http://$LISTEN_ADDR/functions/v1/webhook-call-capture \\
  -H "Content-Type: application/json" \\
  -H "x-api-key: $KEY" \\
  -d '{"company_id": "$COMPANY", "caller_number": "+919876543210", "recipient_number": "+919123456789", "duration_seconds": 180, "outcome": "follow_up", "notes": "Customer interested in service", "external_call_id": "CALL-12345"}'

Check the whole integration (the API document's Example 1 and 2), and watch the status pages:

CALLCAP_URL=http://$LISTEN_ADDR CALLCAP_API_KEY=$KEY CALLCAP_COMPANY_ID=$COMPANY node examples/test-webhook.js
  gateway status  http://$LISTEN_ADDR/status     worker status  http://$METRICS_ADDR/

Then see it stored:

psql "$DATABASE_URL" -c "select id, outcome, notes, stored_at from call_history order by stored_at desc limit 5"

Stop everything with: bash deploy/down.sh
MSG
