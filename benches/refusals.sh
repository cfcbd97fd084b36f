#!/usr/bin/env bash
# benches/refusals.sh — what one refusal costs wsgate, in user-space instructions (callgrind):
# a status-mode 503 beside a close-mode 101 + Close 1013 (docs/behaviour.md#refusals-a-browser-can-see),
# with an admitted upgrade for scale.
#
#   benches/refusals.sh [--no-build] [--out DIR]
#
# wsgate runs under `valgrind --tool=callgrind` in front of the bench tool's echo, once per scenario:
#   status    max_clients 1, one connection holding the slot (opened by this script), the default
#             refusal_mode: REFUSE_TOTAL upgrades, 4 at a time (`wsgate-bench refuse`), each a 503
#   close     the same with WSGATE_REFUSAL_MODE=close: each a 101, Close 1013 and the client's Close
#             reply (tokio-tungstenite's), then wsgate closes TCP
#   admitted  no cap: REFUSE_TOTAL upgrades, 4 at a time (`wsgate-bench handshake`), each spliced to
#             the echo and closed by the client: run.sh --callgrind's handshake phase
# After a warm-up of 20, the counters are zeroed, the REFUSE_TOTAL run is made, and the counters are
# dumped: instructions of the whole wsgate process (every thread) ÷ the answers the tool counted.
# Prints one JSON line per scenario and a table; with --out DIR, also the lines (refusals.jsonl)
# and each scenario's top functions (callgrind-refusals-SCENARIO.txt, benches/cg_top.py).
#
# Env: REFUSE_TOTAL (default 300); BENCH_WSGATE_BIN (default: release/wsgate of the cargo target
# directory, CARGO_TARGET_DIR honoured; built unless --no-build); the bench tool likewise.
# Everything runs on 127.0.0.1 with ephemeral ports; only the processes started here are stopped,
# by PID. Installs valgrind from Debian if it is missing.
set -euo pipefail

# Same niceness as run.sh gives its processes (the machine is shared).
if [[ "$(nice)" == "0" && -z "${WSGATE_BENCH_NO_NICE:-}" ]]; then
    exec nice -n 10 "$0" "$@"
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf '[refusals.sh %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

BUILD=1
OUT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --no-build) BUILD=0 ;;
        --out) OUT="$2"; shift ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "refusals.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
TOTAL="${REFUSE_TOTAL:-300}"

# The cargo target directory of a manifest, as cargo reports it (CARGO_TARGET_DIR honoured).
target_dir() {
    cargo metadata --format-version 1 --no-deps --manifest-path "$1" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])'
}
if [[ $BUILD == 1 ]]; then
    log "building wsgate-bench and wsgate (release)"
    cargo build --release --quiet --manifest-path "$ROOT/benches/wsgate-bench/Cargo.toml"
    [[ -n "${BENCH_WSGATE_BIN:-}" ]] || cargo build --release --quiet --bin wsgate --manifest-path "$ROOT/Cargo.toml"
fi
BENCH="$(target_dir "$ROOT/benches/wsgate-bench/Cargo.toml")/release/wsgate-bench"
WSGATE="${BENCH_WSGATE_BIN:-$(target_dir "$ROOT/Cargo.toml")/release/wsgate}"
[[ -x "$BENCH" && -x "$WSGATE" ]] || { log "missing $BENCH or $WSGATE (run without --no-build)"; exit 1; }
if ! command -v valgrind >/dev/null; then
    log "installing valgrind from Debian"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
fi

WORK="$(mktemp -d /tmp/wsgate-refusals.XXXXXX)"
PIDS=()
HOLD=""
stop_all() {
    local p
    [[ -n "$HOLD" ]] && { exec {HOLD}>&-; HOLD=""; }
    for p in "${PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null || continue
        for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    PIDS=()
}
trap 'stop_all; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

# file pattern -> the IP:PORT after `addr=` on the first matching line (bounded: 60 s, valgrind is slow)
addr_in() {
    local v
    for _ in $(seq 1 1200); do
        v="$(sed 's/\x1b\[[0-9;]*m//g' "$1" 2>/dev/null | grep -m1 "$2" | sed -n -E 's/.*addr=([0-9.:]+).*/\1/p' || true)"
        [[ -n "$v" ]] && { echo "$v"; return 0; }
        sleep 0.05
    done
    return 1
}

"$BENCH" echo --listen 127.0.0.1:0 > "$WORK/echo.out" 2> "$WORK/echo.err" &
PIDS+=("$!")
ECHO="$(addr_in "$WORK/echo.out" 'echo listening')" || { log "the echo did not start"; exit 1; }

# scenario cap extra-env... -> one JSON line on stdout
scenario() {
    local name="$1" cap="$2" mode dump ir line n before
    shift 2
    mode=refuse
    [[ "$name" == admitted ]] && mode=handshake
    rm -f "$WORK"/cg.out*
    env -i PATH="$PATH" WSGATE_UPSTREAM="$ECHO" WSGATE_LISTEN=127.0.0.1:0 WSGATE_ADMIN_LISTEN=127.0.0.1:0 \
        WSGATE_MAX_CLIENTS="$cap" "$@" \
        valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out" -q "$WSGATE" \
        > "$WORK/$name.out" 2> "$WORK/$name.err" &
    local pid=$!
    PIDS+=("$pid")
    local proxy
    proxy="$(addr_in "$WORK/$name.err" 'proxy listening')" || { log "$name: wsgate did not start"; tail -5 "$WORK/$name.err" >&2; return 1; }
    if [[ "$cap" != 0 ]]; then
        # The one slot, held for the whole scenario by a socket of this shell.
        exec {HOLD}<>"/dev/tcp/${proxy%:*}/${proxy##*:}"
        printf 'GET / HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n' "$proxy" >&"$HOLD"
        local status=""
        read -r -t 60 status <&"$HOLD" || true
        [[ "$status" == *" 101 "* ]] || { log "$name: the held connection got: $status"; return 1; }
    fi
    "$BENCH" --threads 2 "$mode" --url "ws://$proxy/" --total 20 --conns 2 --timeout 30 >/dev/null 2>&1 || true
    before="$(find "$WORK" -maxdepth 1 -name 'cg.out.*' | wc -l)"
    callgrind_control -z "$pid" >/dev/null 2>&1 || true
    line="$("$BENCH" --threads 2 "$mode" --url "ws://$proxy/" --total "$TOTAL" --conns 4 --timeout 30 \
        --max-time 600 --target "$name" 2>/dev/null || true)"
    callgrind_control -d "$pid" >/dev/null 2>&1 || true
    for _ in $(seq 1 100); do
        (( $(find "$WORK" -maxdepth 1 -name 'cg.out.*' | wc -l) > before )) && break
        sleep 0.1
    done
    dump="$(find "$WORK" -maxdepth 1 -name 'cg.out.*' -printf '%T@ %p\n' | sort -n | tail -1 | cut -d' ' -f2-)"
    ir="$(grep -m1 -E '^(summary|totals):' "$dump" 2>/dev/null | awk '{print $2}')"
    [[ -n "$OUT" ]] && python3 "$ROOT/benches/cg_top.py" "$dump" 30 > "$OUT/callgrind-refusals-$name.txt" 2>/dev/null || true
    [[ -n "$HOLD" ]] && { exec {HOLD}>&-; HOLD=""; }
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    python3 -c 'import json, sys
name, ir, line = sys.argv[1], float(sys.argv[2] or 0), sys.argv[3]
try:
    r = json.loads(line)
except ValueError:
    r = {"ok": False}
n = r.get("refusals", r.get("upgrades", 0)) or 0
print(json.dumps({"scenario": name, "ok": bool(r.get("ok")) and ir > 0 and n > 0,
                  "answers": n, "ir": int(ir), "ir_per_answer": round(ir / n) if n else None,
                  "statuses": r.get("statuses"), "closed_1013": r.get("closed_1013"),
                  "other": r.get("other", r.get("failure_kinds"))}))' "$name" "${ir:-0}" "$line"
}

[[ -n "$OUT" ]] && mkdir -p "$OUT"
RESULTS="$WORK/refusals.jsonl"
log "status: a 503 per refusal ($TOTAL)"
scenario status 1 >> "$RESULTS"
log "close: a 101 and Close 1013 per refusal ($TOTAL)"
scenario close 1 WSGATE_REFUSAL_MODE=close >> "$RESULTS"
log "admitted: an upgrade spliced to the echo and closed ($TOTAL)"
scenario admitted 0 >> "$RESULTS"
cat "$RESULTS"
[[ -n "$OUT" ]] && cp "$RESULTS" "$OUT/refusals.jsonl"
python3 - "$RESULTS" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| scenario | answers | instructions per answer | × status 503 |")
print("| --- | --- | --- | --- |")
base = next((r["ir_per_answer"] for r in rows if r["scenario"] == "status" and r["ir_per_answer"]), None)
for r in rows:
    per = r["ir_per_answer"]
    x = f"{per / base:.2f}" if per and base else "—"
    shown = f"{per:,}" if per is not None else "—"
    print(f"| {r['scenario']} | {r['answers']} | {shown} | {x} |")
sys.exit(0 if all(r["ok"] for r in rows) else 1)
EOF
