#!/usr/bin/env bash
# Runs every test: installs what is missing (nats-server 2.15+, PostgreSQL, FUSE, the
# deploy checks' kubernetes-validate and promtool, Node.js for examples/, chromium for the
# status pages, schemathesis for the OpenAPI run, the telephony providers' SDKs that sign
# the callback tests' requests, SeaweedFS for the archive's S3-compatible store), then
# `cargo test --workspace`. Tests start their own nats-server on free ports and create a
# fresh database per test on the server at DATABASE_URL.
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
ensure_node
ensure_chromium
log "nats-server: $NATS_SERVER_BIN ($("$NATS_SERVER_BIN" --version))"
log "postgres:    $DATABASE_URL"
exec cargo test --workspace "$@"
