#!/usr/bin/env bash
# Tests wsgate with clients nobody here wrote: Python `websockets` (close frames
# on drain / lifetime / idle, permessage-deflate end to end), Node's `ws` and
# headless Chromium (echo, the cap's 503, the drain's 1001).
#
#   bash tests/clients/run.sh [extra pytest args]
#
# Needs target/debug/wsgate (WSGATE_BIN overrides). Creates target/clients-venv
# with the pinned packages of requirements.txt, installs the pinned `ws` of
# node/package-lock.json (npm ci) and Debian's chromium if missing; safe to run
# again; no stdin.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
VENV="${CLIENTS_VENV:-$ROOT/target/clients-venv}"
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
export WSGATE_BIN="${WSGATE_BIN:-$ROOT/target/debug/wsgate}"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$ROOT/tests/clients" "$@"
