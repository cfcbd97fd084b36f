#!/usr/bin/env bash
# Opt-in, not part of run.sh or CI: builds deploy/Dockerfile's runtime stage with podman around a
# binary built here, then checks the image configuration. The full multi-stage build needs the
# rust:alpine base image, which this environment cannot pull; the runtime stage is FROM scratch,
# so it can be built offline. The binary is glibc static-pie (crt-static) instead of musl, since
# the musl target cannot be installed here; both need no libc in the image.
#
#   bash deploy/tests/podman-runtime-check.sh        (needs podman: apt-get install podman)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
command -v podman >/dev/null || { echo "podman not installed (apt-get install podman)"; exit 2; }
TARGET_DIR="${STATIC_TARGET_DIR:-$ROOT/target/static}"
( cd "$ROOT" && CARGO_TARGET_DIR="$TARGET_DIR" RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build -q --target x86_64-unknown-linux-gnu --bin wsgate )
BIN="$TARGET_DIR/x86_64-unknown-linux-gnu/debug/wsgate"
file "$BIN" | grep -q 'static' || { echo "not a static binary: $(file "$BIN")"; exit 1; }

CTX="$(mktemp -d)"
trap 'rm -rf "$CTX"' EXIT
cp "$BIN" "$CTX/wsgate"
# The runtime stage verbatim, with the build stage's output replaced by the local binary.
sed -n '/^FROM scratch AS runtime/,$p' "$ROOT/deploy/Dockerfile" \
  | sed 's#^COPY --from=build /out/wsgate /wsgate#COPY wsgate /wsgate#' >"$CTX/Containerfile"
grep -q '^COPY wsgate /wsgate' "$CTX/Containerfile"
podman build -q --network=none -f "$CTX/Containerfile" -t localhost/wsgate:runtime-check "$CTX" >/dev/null
cfg="$(podman image inspect localhost/wsgate:runtime-check --format '{{json .Config}}')"
echo "$cfg"
python3 - "$cfg" <<'PY'
import json, sys
c = json.loads(sys.argv[1])
assert c["User"] == "65532:65532", c["User"]
assert set(c["ExposedPorts"]) == {"8080/tcp", "9090/tcp"}, c["ExposedPorts"]
assert c["Entrypoint"] == ["/wsgate"], c["Entrypoint"]
assert c.get("StopSignal") == "SIGTERM"
print("runtime image OK: non-root 65532, ports 8080/9090, ENTRYPOINT /wsgate, no shell")
PY
podman rmi -f localhost/wsgate:runtime-check >/dev/null
