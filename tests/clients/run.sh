#!/usr/bin/env bash
# Tests wsgate with a client library nobody here wrote (Python `websockets`):
# close frames on drain / lifetime / idle, permessage-deflate end to end.
#
#   bash tests/clients/run.sh [extra pytest args]
#
# Needs target/debug/wsgate (WSGATE_BIN overrides). Creates target/clients-venv
# with the pinned packages of requirements.txt; safe to run again; no stdin.
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
export WSGATE_BIN="${WSGATE_BIN:-$ROOT/target/debug/wsgate}"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$ROOT/tests/clients" "$@"
