#!/usr/bin/env bash
# Tests the container image end to end: builds it (build.sh), runs nats-server on the
# host, then the gateway and the worker as containers (podman, host network), creates a
# key with the image's own CLI, posts a record and finds it in Postgres, and stops both
# containers with SIGTERM, expecting a clean exit.
#
# Settings (environment): DATABASE_URL (the local server), PODMAN_RUNTIME (unset: the
# default runtime, else runc when the default cannot start a container here, e.g. crun
# on a hybrid cgroup v1/v2 host).
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/lib.sh
ensure_nats_server
ensure_postgres
IMAGE=${IMAGE:-localhost/callcap:latest}
export IMAGE
bash deploy/container/build.sh

# Limits the container may have: no higher than this shell's (a sandbox may refuse more).
ULIMITS=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit "nproc=4096:4096")
PODMAN=(podman)
[ -n "${PODMAN_RUNTIME:-}" ] && PODMAN+=(--runtime "$PODMAN_RUNTIME")
if ! "${PODMAN[@]}" run --rm "${ULIMITS[@]}" --network host "$IMAGE" /ingest-gateway --version >/dev/null 2>&1; then
  command -v runc >/dev/null || { [ "$(id -u)" -eq 0 ] && apt-get install -y -qq runc >&2; } || true
  PODMAN=(podman --runtime runc)
  "${PODMAN[@]}" run --rm "${ULIMITS[@]}" --network host "$IMAGE" /ingest-gateway --version >&2 \
    || die "podman cannot start a container here, with its default runtime or runc"
fi

WORK=$(mktemp -d)
NATS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
GATEWAY_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
METRICS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
DB="callcap_container_$$"
cleanup() {
  "${PODMAN[@]}" rm -f "cc-gw-$$" "cc-wk-$$" >/dev/null 2>&1 || true
  [ -n "${NATS_PID:-}" ] && kill "$NATS_PID" 2>/dev/null
  psql "$DATABASE_URL" -qc "drop database if exists $DB" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
# The broker admits only the pipeline's NATS identities. The seeds are made readable for
# the image's unprivileged user (uid 65532) in this throwaway directory only; in
# production each is a Secret mounted for its own service (deploy/k8s).
cargo build --quiet -p ingest-gateway
ensure_nkeys "$WORK/nkeys" target/debug/ingest-gateway
mkdir -p "$WORK/cnk" && cp "$WORK"/nkeys/*.nk "$WORK/cnk/" && chmod 755 "$WORK/cnk" && chmod 644 "$WORK"/cnk/*.nk
"$NATS_SERVER_BIN" -c deploy/nats/single.conf -a 127.0.0.1 -p "$NATS_PORT" -m 0 -sd "$WORK/js" > "$WORK/nats.log" 2>&1 &
NATS_PID=$!
psql "$DATABASE_URL" -qc "create database $DB"
# "localhost" rather than 127.0.0.1: the static binary must resolve names by itself.
NATS="nats://localhost:$NATS_PORT"
DBURL=$(with_database "$DATABASE_URL" "$DB" | sed 's/127\.0\.0\.1/localhost/')
run() { "${PODMAN[@]}" run "${ULIMITS[@]}" --network host -v "$WORK/cnk:/nkeys:ro" "$@"; }

log "starting the gateway and the worker containers"
run -d --name "cc-gw-$$" -e NATS_URL="$NATS" -e NATS_NKEY_FILE=/nkeys/gateway.nk -e LISTEN_ADDR="127.0.0.1:$GATEWAY_PORT" "$IMAGE" /ingest-gateway >/dev/null
run -d --name "cc-wk-$$" -e NATS_URL="$NATS" -e NATS_NKEY_FILE=/nkeys/worker.nk -e DATABASE_URL="$DBURL" -e METRICS_ADDR="127.0.0.1:$METRICS_PORT" \
  "$IMAGE" /persist-worker >/dev/null
for _ in $(seq 1 60); do
  curl -fsS "http://127.0.0.1:$GATEWAY_PORT/readyz" >/dev/null 2>&1 && curl -fsS "http://127.0.0.1:$METRICS_PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -fsS "http://127.0.0.1:$GATEWAY_PORT/readyz" >/dev/null || { "${PODMAN[@]}" logs "cc-gw-$$" >&2; die "gateway container not ready"; }
curl -fsS "http://127.0.0.1:$METRICS_PORT/readyz" >/dev/null || { "${PODMAN[@]}" logs "cc-wk-$$" >&2; die "worker container not ready"; }

COMPANY=$(python3 -c 'import uuid; print(uuid.uuid4())')
KEY=$(run --rm -e NATS_URL="$NATS" -e NATS_NKEY_FILE=/nkeys/admin.nk "$IMAGE" /ingest-gateway keys create --company "$COMPANY" --name container-test | tail -n1)
wait_key "$KEY" "http://127.0.0.1:$GATEWAY_PORT" # the key reaches the gateway through its KV watch
STATUS=$(curl -sS -o "$WORK/resp" -w '%{http_code}' -X POST "http://127.0.0.1:$GATEWAY_PORT/v1/calls" \
  -H 'Content-Type: application/json' -H "x-api-key: $KEY" \
  -d "{\"company_id\":\"$COMPANY\",\"caller_number\":\"+919876543210\",\"recipient_number\":\"+919123456789\",\"duration_seconds\":180,\"outcome\":\"follow_up\",\"external_call_id\":\"CONTAINER-1\"}")
[ "$STATUS" = 201 ] || die "POST answered $STATUS: $(cat "$WORK/resp")"
for _ in $(seq 1 40); do
  [ "$(psql "$DBURL" -tAc "select count(*) from call_history where company_id = '$COMPANY'")" = 1 ] && break
  sleep 0.5
done
[ "$(psql "$DBURL" -tAc "select count(*) from call_history where company_id = '$COMPANY'")" = 1 ] \
  || die "the record was not stored"

log "SIGTERM both containers"
"${PODMAN[@]}" stop -t 30 "cc-gw-$$" "cc-wk-$$" >/dev/null
for c in "cc-gw-$$" "cc-wk-$$"; do
  code=$("${PODMAN[@]}" inspect -f '{{.State.ExitCode}}' "$c")
  [ "$code" = 0 ] || { "${PODMAN[@]}" logs "$c" >&2; die "$c exited $code after SIGTERM"; }
done
SIZE=$("${PODMAN[@]}" image inspect -f '{{.Size}}' "$IMAGE")
log "container image OK: $IMAGE ($((SIZE / 1024 / 1024)) MiB), 201 stored, clean SIGTERM exits"
