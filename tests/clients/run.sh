#!/usr/bin/env bash
# Tests wsgate with clients nobody here wrote: Python `websockets` (close frames
# on drain / lifetime / idle, permessage-deflate end to end), Node's `ws` and
# headless Chromium (echo, the cap's 503, the drain's 1001); `websockets` and `ws`
# also against the message guards and the handshake policy (Origin, subprotocols,
# a JWT in the subprotocol).
#
#   bash tests/clients/run.sh [extra pytest args]
#
# Needs debug/wsgate in the cargo target directory (CARGO_TARGET_DIR honoured; WSGATE_BIN
# overrides). Creates clients-venv there with the pinned packages of requirements.txt, installs the pinned `ws` of
# node/package-lock.json (npm ci) and Debian's chromium if missing; safe to run
# again; no stdin.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
# The cargo target directory: CARGO_TARGET_DIR when set (a shared build cache), else the workspace's
# target/, as cargo itself reports it; target/ when cargo cannot say.
cargo_target_dir() {
  cargo metadata --format-version 1 --no-deps --manifest-path "$ROOT/Cargo.toml" 2>/dev/null |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null ||
    echo "$ROOT/target"
}
TARGET_DIR="$(cargo_target_dir)"
VENV="${CLIENTS_VENV:-$TARGET_DIR/clients-venv}"
REQ="$ROOT/tests/clients/requirements.txt"
if [[ ! -x "$VENV/bin/python" || ! -f "$VENV/.req" ]] || ! cmp -s "$REQ" "$VENV/.req"; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQ" </dev/null
  cp "$REQ" "$VENV/.req"
fi
if [[ -z "${CHROMIUM_BIN:-}" ]] && ! command -v chromium >/dev/null; then
  echo "[tests/clients] installing Debian's chromium"
  # shellcheck source=../../.ci/apt-install.sh
  source "$ROOT/.ci/apt-install.sh"
  apt_install chromium
fi
NODE_DIR="$ROOT/tests/clients/node"
if [[ ! -f "$NODE_DIR/node_modules/.package-lock.json" ]] ||
   ! cmp -s "$NODE_DIR/package-lock.json" "$NODE_DIR/node_modules/.wsgate-lock"; then
  (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error </dev/null)
  cp "$NODE_DIR/package-lock.json" "$NODE_DIR/node_modules/.wsgate-lock"
fi
export WSGATE_BIN="${WSGATE_BIN:-$TARGET_DIR/debug/wsgate}"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$ROOT/tests/clients" "$@"
