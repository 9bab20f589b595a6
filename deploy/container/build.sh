#!/usr/bin/env bash
# Builds the container image localhost/callcap:latest (deploy/container/Containerfile)
# with podman: static release binaries of both services, stripped, on scratch. Nothing
# is pulled from a registry. Prints the image id.
#
# Settings (environment): IMAGE (localhost/callcap:latest), CARGO_TARGET_DIR (target).
set -euo pipefail
cd "$(dirname "$0")/../.."
. deploy/lib.sh
ensure_rust
command -v podman >/dev/null || die "podman is needed (Debian: apt-get install podman)"
IMAGE=${IMAGE:-localhost/callcap:latest}
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
case "$TRIPLE" in
  *-linux-gnu) ;;
  *) die "static builds are set up for *-linux-gnu hosts; this is $TRIPLE" ;;
esac
TARGET_DIR=${CARGO_TARGET_DIR:-target}

log "building static release binaries ($TRIPLE, crt-static)"
# --target keeps these apart from the normal (dynamic) build in target/release.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --quiet \
  --target "$TRIPLE" -p ingest-gateway -p persist-worker
CTX=$(mktemp -d)
trap 'rm -rf "$CTX"' EXIT
for bin in ingest-gateway persist-worker; do
  src="$TARGET_DIR/$TRIPLE/release/$bin"
  file "$src" 2>/dev/null | grep -q "static" || ldd "$src" 2>&1 | grep -q "not a dynamic" \
    || die "$src is not statically linked"
  strip -o "$CTX/$bin" "$src"
done
CA=/etc/ssl/certs/ca-certificates.crt
[ -f "$CA" ] || die "$CA is missing (Debian: apt-get install ca-certificates)"
cp "$CA" "$CTX/"
log "podman build -t $IMAGE"
podman build --quiet -t "$IMAGE" -f deploy/container/Containerfile "$CTX"
