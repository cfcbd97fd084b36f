#!/usr/bin/env bash
# Runs the deployment tests (deploy/tests) with real engines: Helm's Go engine (helm-python-sdk),
# the Kubernetes OpenAPI schemas (kubernetes-validate), promtool and a Prometheus server scraping
# running `wsgate demo`s (one with fleet limits through a private redis-server), jq and curl for the
# README's examples. Installs what it needs itself; safe to run again; no stdin needed.
#
#   bash deploy/tests/run.sh [extra pytest args]
#
# Environment: WSGATE_BIN (default debug/wsgate in the cargo target directory, which honours
# CARGO_TARGET_DIR), DEPLOY_VENV (default deploy-venv in that directory),
# PROMETHEUS_BIN, PROMTOOL_BIN, REDIS_SERVER_BIN (default the Debian packages' binaries).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
export DEBIAN_FRONTEND=noninteractive

log() { printf '[deploy/tests] %s\n' "$*"; }

# The cargo target directory: CARGO_TARGET_DIR when set (a shared build cache), else the workspace's
# target/, as cargo itself reports it; target/ when cargo cannot say.
cargo_target_dir() {
  cargo metadata --format-version 1 --no-deps --manifest-path "$ROOT/Cargo.toml" 2>/dev/null |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null ||
    echo "$ROOT/target"
}
TARGET_DIR="$(cargo_target_dir)"

# shellcheck source=../../.ci/apt-install.sh
source "$ROOT/.ci/apt-install.sh"

# 1. Prometheus and promtool from Debian. The package's postinst may try to start a service;
#    the tests only use the binaries and start their own server on an ephemeral port.
if [[ ! -x /usr/bin/prometheus || ! -x /usr/bin/promtool ]]; then
  log "installing the Debian prometheus package"
  apt_install prometheus
fi
export PROMETHEUS_BIN="${PROMETHEUS_BIN:-/usr/bin/prometheus}"
export PROMTOOL_BIN="${PROMTOOL_BIN:-/usr/bin/promtool}"

# 1b. redis-server from Debian, for the end-to-end test's fleet pod (docs/operations.md#fleet-wide-limits). Only the binary is
#     used: the test starts a private server on an ephemeral loopback port, without persistence
#     (a service the package's postinst may start is not used).
if [[ -z "${REDIS_SERVER_BIN:-}" && ! -x /usr/bin/redis-server ]]; then
  log "installing the Debian redis-server package"
  apt_install redis-server
fi
export REDIS_SERVER_BIN="${REDIS_SERVER_BIN:-/usr/bin/redis-server}"

# 1c. jq and curl from Debian: test_helm_session_telemetry.py runs the README's jq examples of the
#     access log and its rebalancing Job's curl loop (against a local stand-in for the pods).
missing=()
command -v jq >/dev/null || missing+=(jq)
command -v curl >/dev/null || missing+=(curl)
if ((${#missing[@]})); then
  log "installing the Debian packages ${missing[*]}"
  apt_install "${missing[@]}"
fi

# 2. A Python venv with pinned packages, rebuilt only when requirements.txt changes.
VENV="${DEPLOY_VENV:-$TARGET_DIR/deploy-venv}"
REQ="$ROOT/deploy/tests/requirements.txt"
STAMP="$VENV/.requirements.sha256"
want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [[ ! -x "$VENV/bin/python" || ! -f "$STAMP" || "$(cat "$STAMP")" != "$want" ]]; then
  PY="$(command -v python3.11 || command -v python3)"
  log "creating venv $VENV with $("$PY" --version 2>&1)"
  rm -rf "$VENV"
  if ! "$PY" -m venv "$VENV" >/dev/null 2>&1; then
    # Debian's system python needs python3-venv for ensurepip.
    log "installing python3-venv"
    apt_install python3-venv
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-input -r "$REQ" </dev/null
  echo "$want" >"$STAMP"
fi

export WSGATE_BIN="${WSGATE_BIN:-$TARGET_DIR/debug/wsgate}"
log "prometheus: $("$PROMETHEUS_BIN" --version 2>&1 | head -n1)"
log "redis: $("$REDIS_SERVER_BIN" --version 2>&1 | head -n1)"
log "helm engine: $("$VENV/bin/python" -c 'import helm_python as h; print("helm-python-sdk", h.__version__, "/ Helm SDK", h.helm_sdk_version())')"
log "kubernetes schemas: $("$VENV/bin/python" -c 'import kubernetes_validate as k; print("kubernetes-validate", k.__version__, "/ Kubernetes", k.latest_version())')"
log "wsgate binary: $WSGATE_BIN"
if command -v podman >/dev/null; then
  log "image: $(podman --version): test_image.py builds the image (deploy/image/build-local.sh; the musl release build takes minutes the first time) and runs it under chroot"
else
  log "image: podman not installed, test_image.py is skipped (apt-get install podman to run it)"
fi

# deploy/tests/pytest.ini: no .pytest_cache in the tree; pytest prints its summary line last.
exec "$VENV/bin/python" -m pytest -c "$ROOT/deploy/tests/pytest.ini" --rootdir "$ROOT/deploy/tests" "$ROOT/deploy/tests" "$@" </dev/null
