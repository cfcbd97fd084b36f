#!/usr/bin/env bash
# benches/handshake-policy.sh — the cost of each handshake policy (docs/security.md#handshake-policy)
# per upgrade, as run.sh variants side by side under callgrind (instructions, deterministic).
#
#   benches/handshake-policy.sh [run.sh options]
#       = benches/run.sh --rounds 0 --callgrind --setup ours \
#             --targets "wsgate wsgate-hdrs wsgate-origin wsgate-proto wsgate-jwtq wsgate-jwtp wsgate-jwtprs"
#       (later options win, e.g. --no-build, --out /tmp/x)
#
# Targets (all the same echo upstream, which selects the first offered subprotocol):
#   wsgate         no policy, no extra header
#   wsgate-hdrs    no policy; every upgrade sends Origin and `Sec-WebSocket-Protocol: chat` (what
#                  the extra headers cost to read and forward, the base of the next two)
#   wsgate-origin  the same headers; allowed_origins is a list of 10 and the Origin matches the last
#   wsgate-proto   the same headers; subprotocols = chat.v3, chat.v2, chat (the offer is rewritten)
#   wsgate-jwtq    one jwt_claim:sub rule, an HS256 token in ?access_token= (the comparison)
#   wsgate-jwtp    the same rule and token, offered as `chat, base64url.bearer.authorization.k8s.io.<jwt>`
#                  with jwt_from = subprotocol
#   wsgate-jwtprs  the same with an RS256 token
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=jwt-mint.sh
source "$ROOT/benches/jwt-mint.sh"

ORIGIN="https://app10.example.com"
ORIGINS="https://app1.example.com"
for i in 2 3 4 5 6 7 8 9; do ORIGINS+=",https://app$i.example.com"; done
ORIGINS+=",$ORIGIN"
HEADERS="Origin: $ORIGIN"$'\n'"Sec-WebSocket-Protocol: chat"
export BENCH_WSGATE_HEADERS_hdrs="$HEADERS" BENCH_WSGATE_HEADERS_origin="$HEADERS" BENCH_WSGATE_HEADERS_proto="$HEADERS"
export BENCH_WSGATE_ENV_origin="WSGATE_ALLOWED_ORIGINS=$ORIGINS"
export BENCH_WSGATE_ENV_proto="WSGATE_SUBPROTOCOLS=chat.v3,chat.v2,chat"

JWT_ENV="WSGATE_CONFIG=$ROOT/benches/conf/key-rule-jwt.toml WSGATE_JWT_JWKS_FILE=$FIX/jwks.json"
HS="$(mint HS256 hs-1)"
export BENCH_WSGATE_ENV_jwtq="$JWT_ENV"
export BENCH_WSGATE_QUERY_jwtq="access_token=$HS"
export BENCH_WSGATE_ENV_jwtp="$JWT_ENV WSGATE_JWT_FROM=subprotocol" BENCH_WSGATE_ENV_jwtprs="$JWT_ENV WSGATE_JWT_FROM=subprotocol"
export BENCH_WSGATE_HEADERS_jwtp="Sec-WebSocket-Protocol: chat, base64url.bearer.authorization.k8s.io.$HS"
export BENCH_WSGATE_HEADERS_jwtprs="Sec-WebSocket-Protocol: chat, base64url.bearer.authorization.k8s.io.$(mint RS256 rsa-1)"

exec "$ROOT/benches/run.sh" --rounds 0 --callgrind --setup ours \
    --targets "wsgate wsgate-hdrs wsgate-origin wsgate-proto wsgate-jwtq wsgate-jwtp wsgate-jwtprs" "$@"
