#!/usr/bin/env bash
# benches/guards.sh — the cost of docs/operations.md#message-guards message guards per message, side by side (run.sh variants).
#
#   benches/guards.sh [run.sh options]
#       = benches/run.sh --modes "latency throughput" \
#             --targets "wsgate-base wsgate wsgate-size wsgate-guards" --setup ours [run.sh options]
#       (later options win, e.g. --rounds 1 --modes latency --out /tmp/x --no-build);
#       then a check that no guard ever acted (GUARDS_CHECK=0 skips it, see below)
#   benches/guards.sh --rounds 0 --callgrind --no-build --out DIR   instructions per message/upgrade/KiB
#
# Targets (all the same echo upstream, loopback, no cap):
#   wsgate-base    the binary from before docs/operations.md#message-guards: BENCH_WSGATE_BIN_base, default
#                  target/base/release/wsgate (build it from commit 51779b0 with
#                  CARGO_TARGET_DIR=target/base; run.sh leaves the target out when it is missing)
#   wsgate         this tree with its defaults: max_fragments is on (a check per frame header, the
#                  guarded path); WSGATE_MAX_FRAGMENTS=0 in its environment would be every guard off
#   wsgate-size    WSGATE_MAX_MESSAGE_SIZE only (1 MiB): a check per frame header, no clock read
#   wsgate-guards  every guard on: WSGATE_MAX_MESSAGE_SIZE=1048576, WSGATE_MESSAGE_RATE=10000000
#                  (burst 0 = one second's worth), WSGATE_MESSAGE_RATE_ACTION=throttle,
#                  WSGATE_BYTE_RATE=10000000000 (10 GB/s, burst one second's worth)
# The limits are far above what the load tool sends (latency: 32-byte messages, throughput:
# 64 KiB messages, per connection at most some 10^5 messages/s and some 10^8 bytes/s on this kind
# of machine), so nothing is ever refused or held back: the variants measure the checking alone.
# GUARDS_SIZE / GUARDS_RATE / GUARDS_BYTE_RATE override the three limits.
#
# The check (after run.sh, unless GUARDS_CHECK=0): wsgate-size and wsgate-guards are started once
# more with an admin port, driven by `latency --conns 64` and `throughput` (3 s each, the run.sh
# settings), and their /metrics scraped: every wsgate_message_guard_total series must be 0 and
# wsgate_messages_total{direction="client_to_upstream"} must have counted the messages. Written to
# OUT/guard-check.txt with --out; exit 1 when a guard acted.
set -euo pipefail

# Same niceness as run.sh gives its processes (the machine is shared).
if [[ "$(nice)" == "0" && -z "${WSGATE_BENCH_NO_NICE:-}" ]]; then
    exec nice -n 10 "$0" "$@"
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf '[guards.sh %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# shellcheck source=variant-check.sh
source "$ROOT/benches/variant-check.sh"

SIZE="${GUARDS_SIZE:-1048576}"
RATE="${GUARDS_RATE:-10000000}"
BYTE_RATE="${GUARDS_BYTE_RATE:-10000000000}"
export BENCH_WSGATE_BIN_base="${BENCH_WSGATE_BIN_base:-$ROOT/target/base/release/wsgate}"
export BENCH_WSGATE_ENV_size="WSGATE_MAX_MESSAGE_SIZE=$SIZE"
export BENCH_WSGATE_ENV_guards="WSGATE_MAX_MESSAGE_SIZE=$SIZE WSGATE_MESSAGE_RATE=$RATE WSGATE_MESSAGE_RATE_ACTION=throttle WSGATE_BYTE_RATE=$BYTE_RATE"

run_variants "latency throughput" "wsgate-base wsgate wsgate-size wsgate-guards" "$@"

[[ "${GUARDS_CHECK:-1}" == 0 ]] && exit "$rc"

# ---------------------------------------------------------------------------------------------
# the check: did any guard act? (run.sh keeps no admin address, so the variants run once more here)
check_setup guards || exit "$rc"

scrape() { # admin addr -> the guard and message series
    python3 -c 'import sys, urllib.request
body = urllib.request.urlopen("http://%s/metrics" % sys.argv[1], timeout=5).read().decode()
for l in body.splitlines():
    if l.startswith(("wsgate_message_guard_total", "wsgate_messages_total")):
        print(l)' "$1"
}

report=()
check_fail=0
for lbl in size guards; do
    evar="BENCH_WSGATE_ENV_$lbl"
    read -r -a extra <<< "${!evar}"
    "$BENCH" echo --listen 127.0.0.1:0 > "$WORK/echo.out" 2>&1 &
    PIDS+=($!)
    echo_addr="$(addr_in "$WORK/echo.out" 'echo listening')" || { log "check: echo did not start"; exit 1; }
    clean=()
    for v in $(compgen -e); do [[ "$v" == WSGATE_* ]] && clean+=(-u "$v"); done
    env "${clean[@]}" WSGATE_UPSTREAM="$echo_addr" WSGATE_LISTEN=127.0.0.1:0 WSGATE_ADMIN_LISTEN=127.0.0.1:0 \
        WSGATE_MAX_CLIENTS=0 "${extra[@]}" "$WSGATE" > "$WORK/wsgate.log" 2>&1 &
    PIDS+=($!)
    proxy="$(addr_in "$WORK/wsgate.log" 'proxy listening')" || { log "check: wsgate-$lbl did not start"; exit 1; }
    admin="$(addr_in "$WORK/wsgate.log" 'admin listening')" || { log "check: no admin address"; exit 1; }
    lat="$("$BENCH" latency --url "ws://$proxy/" --conns 64 --duration 3 --target "wsgate-$lbl" 2>/dev/null || true)"
    thr="$("$BENCH" throughput --url "ws://$proxy/" --conns 4 --inflight 8 --duration 3 --target "wsgate-$lbl" 2>/dev/null || true)"
    series="$(scrape "$admin")"
    moved="$(python3 -c 'import json,sys
a=json.loads(sys.argv[1] or "{}"); b=json.loads(sys.argv[2] or "{}")
print("latency ok=%s %s msgs (%s/s); throughput ok=%s %s MB/s" % (a.get("ok"), a.get("msgs"), a.get("msgs_per_s"), b.get("ok"), b.get("mb_per_s")))' "$lat" "$thr")"
    acted="$(grep '^wsgate_message_guard_total' <<< "$series" | awk '$2 != 0' || true)"
    sent="$(grep 'wsgate_messages_total{direction="client_to_upstream"}' <<< "$series" | awk '{print $2}')"
    report+=("# wsgate-$lbl (${extra[*]}): $moved" "$series")
    if [[ -n "$acted" || -z "$sent" || "$sent" == 0 ]]; then
        check_fail=1; log "check FAILED for wsgate-$lbl: guard acted or nothing counted: ${acted:-messages=$sent}"
    else
        log "check wsgate-$lbl: no guard acted, $sent client messages forwarded ($moved)"
    fi
    stop_all
done
printf '%s\n' "${report[@]}" >&2
[[ -n "$OUT" && -d "$OUT" ]] && printf '%s\n' "${report[@]}" > "$OUT/guard-check.txt"
[[ $check_fail == 0 ]] || rc=1
exit "$rc"
