#!/usr/bin/env bash
# benches/fleet.sh — the cost of docs/operations.md#fleet-wide-limits fleet limits per upgrade, side by side (run.sh variants).
#
#   benches/fleet.sh [run.sh options]
#       = benches/run.sh --modes "latency handshake" \
#             --targets "wsgate wsgate-fleet wsgate-fleetkey" --setup ours [run.sh options]
#       (later options win, e.g. --rounds 1 --modes handshake --out /tmp/x --no-build);
#       handshake runs are HS_TOTAL=10000 upgrades unless HS_TOTAL is set;
#       then benches/fleet-latency.py against the same Redis (the added admission latency,
#       sequential upgrades; FLEET_LATENCY=0 skips it, FLEET_LATENCY_ARGS="..." passes options)
#   benches/fleet.sh --rounds 0 --callgrind --no-build --out DIR   instructions per upgrade/message
#       (FLEET_LATENCY=0 FLEET_ENV_EXTRA=WSGATE_FLEET_TIMEOUT=1s: see below)
#
# Targets (all the same echo upstream, loopback, no local cap):
#   wsgate           this tree, fleet limits off
#   wsgate-fleet     WSGATE_FLEET_REDIS_URL = the private Redis below, WSGATE_FLEET_MAX_CLIENTS =
#                    1000000: nothing is ever refused, every upgrade does one admission round trip
#                    (one EVALSHA) and queues one release (given back in batches)
#   wsgate-fleetkey  the same plus one `fleet = true` key rule, conf/fleet-key-rule.toml
#                    (key = "header:host", max_per_key = 1000000): still one round trip, the
#                    admission script checks and adds to two sorted sets instead of one
#
# Redis: a private redis-server (Debian 7.0, /usr/bin/redis-server) on a free loopback port,
# --save '' --appendonly no, its --dir a temporary directory; stopped by PID at exit. Its
# INFO commandstats before/after the run.sh part go to stderr (and to OUT/redis-*.txt with --out):
# the EVALSHA count says how many admissions reached Redis.
set -euo pipefail

# Same niceness as run.sh gives its processes, for Redis too (the machine is shared).
if [[ "$(nice)" == "0" && -z "${WSGATE_BENCH_NO_NICE:-}" ]]; then
    exec nice -n 10 "$0" "$@"
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf '[fleet.sh %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

OUT=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    [[ "${args[$i]}" == --out ]] && OUT="${args[$((i + 1))]:-}"
done

REDIS_DIR="$(mktemp -d /tmp/wsgate-fleet-redis.XXXXXX)"
REDIS_PID=""
stop_redis() {
    if [[ -n "$REDIS_PID" ]]; then
        kill -TERM "$REDIS_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$REDIS_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$REDIS_PID" 2>/dev/null || true
        wait "$REDIS_PID" 2>/dev/null || true
        REDIS_PID=""
    fi
    rm -rf "$REDIS_DIR"
}
trap stop_redis EXIT
trap 'exit 130' INT TERM

REDIS_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$REDIS_DIR" \
    > "$REDIS_DIR/redis.log" 2>&1 &
REDIS_PID=$!
for _ in $(seq 1 100); do
    [[ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null || true)" == PONG ]] && break
    sleep 0.05
done
[[ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null || true)" == PONG ]] \
    || { log "redis-server did not start:"; tail -5 "$REDIS_DIR/redis.log" >&2; exit 1; }
REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
log "redis-server $(redis-server --version | awk '{print $3}') pid $REDIS_PID at $REDIS_URL"

redis_stats() { # label -> commandstats, key count and {wsgate}:all size
    {
        echo "# $1"
        redis-cli -p "$REDIS_PORT" info commandstats | tr -d '\r' | grep -E '^cmdstat_(evalsha|eval|script|multi|exec|zrem|zadd)' || true
        echo "dbsize=$(redis-cli -p "$REDIS_PORT" dbsize)"
        echo "zcard_all=$(redis-cli -p "$REDIS_PORT" zcard '{wsgate}:all')"
    }
}

# 10,000 upgrades a run (as key-rules.sh): proxy CPU is read in 10 ms ticks
export HS_TOTAL="${HS_TOTAL:-10000}"
# FLEET_ENV_EXTRA="KEY=VALUE ..." goes to both fleet variants (e.g. WSGATE_FLEET_TIMEOUT=1s under
# --callgrind, where valgrind slows wsgate's side of the round trip past the default 100ms)
export BENCH_WSGATE_ENV_fleet="WSGATE_FLEET_REDIS_URL=$REDIS_URL WSGATE_FLEET_MAX_CLIENTS=1000000${FLEET_ENV_EXTRA:+ $FLEET_ENV_EXTRA}"
export BENCH_WSGATE_ENV_fleetkey="$BENCH_WSGATE_ENV_fleet WSGATE_CONFIG=$ROOT/benches/conf/fleet-key-rule.toml"

redis-cli -p "$REDIS_PORT" config resetstat >/dev/null
LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
log "load average at start: $LOAD_START"
rc=0
"$ROOT/benches/run.sh" --modes "latency handshake" \
    --targets "wsgate wsgate-fleet wsgate-fleetkey" --setup ours "$@" || rc=$?
after="$(redis_stats "after run.sh (stats reset before it); EVALSHA = admissions + one renewal per wsgate start")"
log "Redis after run.sh:"; echo "$after" >&2
[[ -n "$OUT" && -d "$OUT" ]] && echo "$after" > "$OUT/redis-after-run.txt"

if [[ "${FLEET_LATENCY:-1}" != 0 ]]; then
    lat_out=()
    [[ -n "$OUT" && -d "$OUT" ]] && lat_out=(--out "$OUT/fleet-latency.json")
    # shellcheck disable=SC2086
    python3 "$ROOT/benches/fleet-latency.py" --redis-url "$REDIS_URL" "${lat_out[@]}" \
        ${FLEET_LATENCY_ARGS:-} || rc=$?
fi
LOAD_END="$(cut -d' ' -f1-3 /proc/loadavg)"
log "load average at start: $LOAD_START, at end: $LOAD_END"
[[ -n "$OUT" && -d "$OUT" ]] && printf 'start=%s\nend=%s\n' "$LOAD_START" "$LOAD_END" > "$OUT/loadavg.txt"
exit "$rc"
