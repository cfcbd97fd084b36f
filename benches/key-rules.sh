#!/usr/bin/env bash
# benches/key-rules.sh — the cost of one docs/operations.md#limits-per-key key rule per upgrade, side by side (run.sh variants).
#
#   benches/key-rules.sh [run.sh options]
#       = benches/run.sh --modes "latency handshake" \
#             --targets "wsgate-base wsgate wsgate-hdr wsgate-jwt wsgate-hs" --setup ours [run.sh options]
#       (later options win, e.g. --rounds 1 --modes handshake --out /tmp/x --no-build);
#       handshake runs are HS_TOTAL=10000 upgrades unless HS_TOTAL is set
#
# Targets (all the same echo upstream, loopback, no cap):
#   wsgate-base  the binary from before docs/operations.md#limits-per-key: BENCH_WSGATE_BIN_base, default
#                target/base/release/wsgate (build it from commit 1a9deb9 with
#                CARGO_TARGET_DIR=target/base; run.sh leaves the target out when it is missing)
#   wsgate       this tree, no config file, no rules
#   wsgate-hdr   one header rule, conf/key-rule-header.toml (key = "header:host")
#   wsgate-jwt   one JWT rule, conf/key-rule-jwt.toml (key = "jwt_claim:sub", token in
#                ?access_token=): an RS256 token signed with tests/fixtures/jwt/rsa.pem (kid rsa-1)
#   wsgate-hs    the same rule and file, an HS256 token (tests/fixtures/jwt/hs256.secret, kid hs-1)
# Every upgrade of a variant carries the same key value, far below its limit: each takes and gives
# back a share of one key, nothing is refused. The tokens are minted here at every run (openssl,
# basenc), `sub` "bench-user", `exp` 2100-01-01.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=jwt-mint.sh
source "$ROOT/benches/jwt-mint.sh"

# 10,000 upgrades a run (≈1.5-2.5 s): proxy CPU is read in 10 ms ticks, 3,000 upgrades is ±4 % of it
export HS_TOTAL="${HS_TOTAL:-10000}"
export BENCH_WSGATE_BIN_base="${BENCH_WSGATE_BIN_base:-$ROOT/target/base/release/wsgate}"
export BENCH_WSGATE_ENV_hdr="WSGATE_CONFIG=$ROOT/benches/conf/key-rule-header.toml"
# the file names the JWKS relative to the repo root; the absolute path (env beats file) makes the
# run independent of the working directory
JWT_ENV="WSGATE_CONFIG=$ROOT/benches/conf/key-rule-jwt.toml WSGATE_JWT_JWKS_FILE=$FIX/jwks.json"
export BENCH_WSGATE_ENV_jwt="$JWT_ENV" BENCH_WSGATE_ENV_hs="$JWT_ENV"
BENCH_WSGATE_QUERY_jwt="access_token=$(mint RS256 rsa-1)"
BENCH_WSGATE_QUERY_hs="access_token=$(mint HS256 hs-1)"
export BENCH_WSGATE_QUERY_jwt BENCH_WSGATE_QUERY_hs

exec "$ROOT/benches/run.sh" --modes "latency handshake" \
    --targets "wsgate-base wsgate wsgate-hdr wsgate-jwt wsgate-hs" --setup ours "$@"
