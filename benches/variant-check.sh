# benches/variant-check.sh — sourced by the variant scripts (guards.sh, access-log.sh): run.sh over
# their variants with the load average around it (run_variants), and for the check they run after
# it, the processes it starts (PIDS, stop_all) and the address a started process logs (addr_in,
# also used by syscalls.sh).
# Not a script of its own. The sourcing script defines ROOT and log().

# run_variants MODES TARGETS [run.sh options...]: runs run.sh, logs the load average at start and
# end (and writes it to OUT/loadavg.txt with --out DIR); sets OUT and rc (run.sh's exit status).
run_variants() {
    local modes="$1" targets="$2" i start end
    shift 2
    local args=("$@")
    OUT=""
    for ((i = 0; i < ${#args[@]}; i++)); do
        [[ "${args[$i]}" == --out ]] && OUT="${args[$((i + 1))]:-}"
    done
    start="$(cut -d' ' -f1-3 /proc/loadavg)"
    log "load average at start: $start"
    rc=0
    "$ROOT/benches/run.sh" --modes "$modes" --targets "$targets" --setup ours "$@" || rc=$?
    end="$(cut -d' ' -f1-3 /proc/loadavg)"
    log "load average at start: $start, at end: $end"
    if [[ -n "$OUT" && -d "$OUT" ]]; then
        printf 'start=%s\nend=%s\n' "$start" "$end" > "$OUT/loadavg.txt"
    fi
}

PIDS=()

# check_setup NAME: the check's load tool (BENCH), binary (WSGATE) and work directory (WORK,
# removed on exit with everything in PIDS stopped); fails when the tool or the binary is missing.
check_setup() {
    BENCH="$ROOT/benches/wsgate-bench/target/release/wsgate-bench"
    WSGATE="${BENCH_WSGATE_BIN:-$ROOT/target/release/wsgate}"
    if [[ ! -x "$BENCH" || ! -x "$WSGATE" ]]; then
        log "check skipped: $BENCH or $WSGATE missing"
        return 1
    fi
    WORK="$(mktemp -d "/tmp/wsgate-$1.XXXXXX")"
    trap 'stop_all; rm -rf "$WORK"' EXIT
    trap 'exit 130' INT TERM
}

# Stops every process in PIDS (TERM, then KILL after 3 s) and reaps it.
stop_all() {
    local p
    for p in "${PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null || continue
        for _ in $(seq 1 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    PIDS=()
}

# file pattern -> the address of the first matching line, text (addr=) or JSON ("addr":"")
# log lines alike (bounded 10 s).
addr_in() {
    local v
    for _ in $(seq 1 200); do
        v="$(sed 's/\x1b\[[0-9;]*m//g' "$1" 2>/dev/null | grep -m1 "$2" | sed -n -E 's/.*addr(=|":")([0-9.:]+).*/\2/p' || true)"
        [[ -n "$v" ]] && { echo "$v"; return 0; }
        sleep 0.05
    done
    return 1
}
