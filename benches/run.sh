#!/usr/bin/env bash
# benches/run.sh — wsgate side by side with NGINX and HAProxy (issue 4).
#
#   benches/run.sh                 full run (≈15 min on 2 cores): builds wsgate and the bench
#                                  tool, installs nginx+haproxy from Debian if missing, runs every
#                                  mode against direct / wsgate / nginx / haproxy interleaved
#                                  round by round, writes BENCHMARKS.md and benches/benchmarks.svg
#   benches/run.sh --callgrind     also count instructions per upgrade/message/KiB of each proxy
#                                  under valgrind's callgrind (deterministic; +1-2 min)
#   benches/run.sh --smoke         every mode of both set-ups at tiny sizes (< ~1 min), exits
#                                  non-zero if a mode fails; writes nothing into the repo (for CI)
#
# Set-ups (issue 15), --setup ours|efficient|both (default both; rounds interleave them too):
#   ours       frame-level echo (`wsgate-bench echo --kind frame`, 2 workers), nginx
#              `worker_processes 2` + `proxy_buffer_size 4k`, haproxy `nbthread 2`, generator on
#              a 2-worker runtime
#   efficient  the peers at their most CPU-efficient here: nginx `worker_processes 1` +
#              `proxy_buffer_size 16k`, haproxy `nbthread 1`; the echo is tokio-tungstenite on a
#              current-thread runtime (`--kind tungstenite`); the generator is single-threaded
#
# Options:  --rounds N (default 5)   --targets "direct wsgate nginx haproxy"   --setup S
#           --no-build (use the binaries already built)
#           --out DIR (results, report and plot go there; BENCHMARKS.md is left alone)
#           --modes "latency throughput handshake idle cap storm" (default: all six; e.g. --modes handshake)
# Variants: --targets "direct wsgate wsgate-cb nginx haproxy" runs wsgate a second time as
#           `wsgate-cb` with the extra environment BENCH_WSGATE_ENV_cb="KEY=VALUE ..." and/or the
#           binary BENCH_WSGATE_BIN_cb=PATH (e.g. copy_bidirectional vs the default splice);
#           BENCH_WSGATE_QUERY_cb="a=1&b=2" is appended to that variant's URL as ?a=1&b=2
#           (e.g. a JWT in ?access_token=, see benches/key-rules.sh);
#           BENCH_WSGATE_HEADERS_cb=$'Origin: https://a.example\nSec-WebSocket-Protocol: chat'
#           adds request headers to every upgrade of that variant (one per line; the echo
#           selects the first offered subprotocol; see benches/handshake-policy.sh);
#           BENCH_WSGATE_WRAP_cb="taskset -c 0" is a command prefix (e.g. pin to one core);
#           BENCH_WSGATE_UPSTREAM_cb=unix makes the variant's WSGATE_UPSTREAM unix:<echo socket>
#           (the echo then also listens on a Unix socket, `echo --unix`);
#           BENCH_WSGATE_SETUP_cb="efficient" runs the variant in those set-ups only (default:
#           all). Worker count: BENCH_WSGATE_ENV_cb="TOKIO_WORKER_THREADS=1" (or WSGATE_WORKERS=1
#           once wsgate has that key); TOKIO_WORKER_THREADS from the caller is not passed on.
# Env:      CAP (cap-mode limit, default 1000)  IDLE_MAX (default: from the descriptor limit)
#           HS_TOTAL (upgrades per handshake-mode run, default 3000)
#           IDLE_CONC (handshakes in flight while idle mode opens its connections, default 128)
#           BENCH_WSGATE_BIN (default target/release/wsgate; with it set, wsgate is not built)
#           STORM_CLIENTS (default 10000), STORM_CAP (default 5000): storm mode's sizes (smoke:
#           200 and 100); both are scaled down, and logged, when the descriptor limit is too low
#           wsgate gets a clean WSGATE_* environment (it refuses unknown WSGATE_ keys): only
#           UPSTREAM, LISTEN, ADMIN_LISTEN, MAX_CLIENTS and a variant's own variables.
#
# Storm mode (reconnect storm: a deploy, a node drain or a network blip, and every client of a
# pod reconnects at once, with no backoff, into a proxy whose cap is half of them):
#   1. before the cut, STORM_CLIENTS clients hold WebSocket connections opened directly to the
#      echo upstream (the pod that goes away), 256 opens in flight, each verified by one echo;
#   2. the cut (t0): all of them are dropped at once (SO_LINGER 0) and every client reconnects
#      through the proxy, started with cap STORM_CAP exactly as in cap mode; no backoff: a refused
#      client (503 or another status, or a 101 followed by a Close, wsgate's close mode sending
#      Close 1013) retries at once on a new connection;
#   3. an attempt is admitted only once one WebSocket message has round-tripped through it (a 101
#      then Close 1013 is a refusal, counted as refused_1013); admitted clients hold on and stop;
#   4. done when STORM_CAP are admitted (all others stop retrying; the attempts in flight finish
#      and must not be admitted), or at --max-time 60 s, a failure that reports how many were;
#   5. reported: time to cap (t0 to the cap-th admission), refusals (503, 1013, other statuses),
#      errors by kind, attempts, the proxy's CPU t0 to done (process tree) and per admission, its
#      peak RSS over the storm (VmHWM reset at t0 via /proc/PID/clear_refs, summed over the tree)
#      and its RSS at the end. ok: admitted == cap, never more than cap admitted at once, no
#      errors. HAProxy's server maxconn queues the attempts that race past its srv_conn check
#      (503 after `timeout queue` 1 s) rather than refusing them: that is allowed.
#   Refused clients read a `Connection: close` answer (wsgate's) to EOF before closing, so TIME_WAIT
#   lands on the proxy's side and no client port piles up; NGINX's and HAProxy's 503s are keep-alive,
#   so those are closed with SO_LINGER 0 (wsgate-bench/src/main.rs, "storm", says why).
#   Direct is skipped (nothing enforces a cap).
#
# Everything runs on 127.0.0.1 only; every load mode is bounded in count and time; the script
# starts its own echo upstream and its own nginx/haproxy/wsgate instances on ephemeral loopback
# ports (never the system services) and stops exactly those, by PID.
set -euo pipefail

# Same niceness for every process of the run (generator, echo, proxies): the machine is shared.
if [[ "$(nice)" == "0" && -z "${WSGATE_BENCH_NO_NICE:-}" ]]; then
    exec nice -n 10 "$0" "$@"
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCHES="$ROOT/benches"
SMOKE=0
CALLGRIND=0
WRAP=()          # prefix for proxy commands (valgrind in the callgrind phase)
WAIT_STEPS=100   # x 0.05 s: how long a proxy may take to start listening
BUILD=1
ROUNDS=5
TARGETS="direct wsgate nginx haproxy"
MODES="latency throughput handshake idle cap storm"
OUT=""
USER_OUT=0
SETUP_ARG=both
while [[ $# -gt 0 ]]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --callgrind) CALLGRIND=1 ;;
        --no-build) BUILD=0 ;;
        --rounds) ROUNDS="$2"; shift ;;
        --targets) TARGETS="$2"; shift ;;
        --modes) MODES="$2"; shift ;;
        --out) OUT="$2"; USER_OUT=1; shift ;;
        --setup) SETUP_ARG="$2"; shift ;;
        -h|--help) sed -n '2,73p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
for m in $MODES; do
    case "$m" in latency|throughput|handshake|idle|cap|storm) ;; *) echo "run.sh: unknown mode $m" >&2; exit 2 ;; esac
done
has_mode() { [[ " $MODES " == *" $1 "* ]]; }
case "$SETUP_ARG" in
    ours|efficient) SETUPS=("$SETUP_ARG") ;;
    both) SETUPS=(ours efficient) ;;
    *) echo "run.sh: unknown set-up $SETUP_ARG (ours, efficient, both)" >&2; exit 2 ;;
esac
# setup_params NAME: the peers' parameters, the echo and the generator of one set-up
SETUP=""
setup_params() {
    SETUP="$1"
    case "$1" in
        ours) NGX_WORKERS=2; NGX_BUF=4k; NGX_BUSY=""; HAP_NBTHREAD=2; ECHO_KIND=frame; GEN_THREADS=2 ;;
        efficient) NGX_WORKERS=1; NGX_BUF=16k; NGX_BUSY="proxy_busy_buffers_size 16k;"; HAP_NBTHREAD=1
                   ECHO_KIND=tungstenite; GEN_THREADS=0 ;;
    esac
}
CAP="${CAP:-1000}"
IDLE_CONC="${IDLE_CONC:-128}"
STORM_CLIENTS="${STORM_CLIENTS:-10000}"
STORM_CAP="${STORM_CAP:-5000}"
if [[ $SMOKE == 1 ]]; then
    ROUNDS=1; CAP="${CAP_SMOKE:-20}"; STORM_CLIENTS="${STORM_CLIENTS_SMOKE:-200}"; STORM_CAP="${STORM_CAP_SMOKE:-100}"
fi

log() { printf '[run.sh %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------------------------------------
# build
BENCH="$BENCHES/wsgate-bench/target/release/wsgate-bench"
WSGATE="${BENCH_WSGATE_BIN:-$ROOT/target/release/wsgate}"
if [[ $BUILD == 1 ]]; then
    log "building wsgate-bench"
    (cd "$BENCHES/wsgate-bench" && cargo build --release --quiet)
    if [[ " $TARGETS " == *" wsgate "* && -z "${BENCH_WSGATE_BIN:-}" ]]; then
        log "building wsgate (cargo build --release at the repo root)"
        if ! (cd "$ROOT" && cargo build --release --quiet --bin wsgate); then
            log "WARNING: wsgate does not build; it is left out of this run"
        fi
    fi
fi
[[ -x "$BENCH" ]] || { log "missing $BENCH (run without --no-build)"; exit 1; }

# ---------------------------------------------------------------------------------------------
# peers
need_pkgs=()
if [[ " $TARGETS " == *" nginx "* ]] && ! command -v nginx >/dev/null; then need_pkgs+=(nginx); fi
if [[ " $TARGETS " == *" haproxy "* ]] && ! command -v haproxy >/dev/null; then need_pkgs+=(haproxy); fi
if [[ ${#need_pkgs[@]} -gt 0 ]]; then
    log "installing ${need_pkgs[*]} from Debian"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
    # the packages' own service is not ours to run: make sure none was left running
    for svc in "${need_pkgs[@]}"; do
        if command -v service >/dev/null; then service "$svc" stop >/dev/null 2>&1 || true; fi
    done
fi
NGINX="$(command -v nginx || true)"; [[ -z "$NGINX" && -x /usr/sbin/nginx ]] && NGINX=/usr/sbin/nginx
HAPROXY="$(command -v haproxy || true)"; [[ -z "$HAPROXY" && -x /usr/sbin/haproxy ]] && HAPROXY=/usr/sbin/haproxy

active=()
for t in $TARGETS; do
    case "$t" in
        direct) active+=(direct) ;;
        wsgate) if [[ -x "$WSGATE" ]]; then active+=(wsgate); else log "WARNING: $WSGATE missing: wsgate left out"; fi ;;
        wsgate-*)  # a variant: extra env from BENCH_WSGATE_ENV_<label>, binary from BENCH_WSGATE_BIN_<label>
            lbl="${t#wsgate-}"; lbl="${lbl//-/_}"; bvar="BENCH_WSGATE_BIN_$lbl"; b="${!bvar:-$WSGATE}"
            if [[ -x "$b" ]]; then active+=("$t"); else log "WARNING: $b missing: $t left out"; fi ;;
        nginx) if [[ -n "$NGINX" ]]; then active+=(nginx); else log "WARNING: nginx missing"; fi ;;
        haproxy) if [[ -n "$HAPROXY" ]]; then active+=(haproxy); else log "WARNING: haproxy missing"; fi ;;
        *) log "unknown target $t"; exit 2 ;;
    esac
done

# variant_var TARGET SUFFIX: the value of BENCH_WSGATE_<SUFFIX>_<label> of a wsgate-<label> target
variant_var() {
    [[ "$1" == wsgate-* ]] || return 0
    local lbl="${1#wsgate-}" v
    lbl="${lbl//-/_}"; v="BENCH_WSGATE_${2}_$lbl"
    printf '%s' "${!v:-}"
}
# in_setup TARGET: does the target run in the current set-up (BENCH_WSGATE_SETUP_<label>)?
in_setup() {
    local only
    only="$(variant_var "$1" SETUP)"
    [[ -z "$only" || " $only " == *" $SETUP "* ]]
}
setup_targets() { local t out=(); for t in "${active[@]}"; do in_setup "$t" && out+=("$t"); done; echo "${out[*]}"; }

# ---------------------------------------------------------------------------------------------
# scratch space and cleanup of exactly what we started
WORK="$(mktemp -d /tmp/wsgate-bench.XXXXXX)"
if [[ -z "$OUT" ]]; then
    if [[ $SMOKE == 1 ]]; then OUT="$WORK/results"; else OUT="$BENCHES/results/$(date -u +%Y%m%dT%H%M%SZ)"; fi
fi
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
# run a private copy of the binaries: a rebuild elsewhere in the tree must not swap them mid-run
if [[ -x "$WSGATE" ]]; then cp "$WSGATE" "$WORK/wsgate.bin"; WSGATE="$WORK/wsgate.bin"; fi
cp "$BENCH" "$WORK/wsgate-bench.bin"; BENCH="$WORK/wsgate-bench.bin"
: > "$RESULTS"
STARTED=()   # PIDs we started and have not stopped yet

is_gone() { # pid -> true when exited (or a zombie)
    local st
    st="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)"
    [[ -z "$st" || "$st" == Z ]]
}
stop_pid() { # pid [signal]
    local pid="$1" i
    kill -"${2:-TERM}" "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    for i in $(seq 1 30); do
        if is_gone "$pid"; then wait "$pid" 2>/dev/null || true; return 0; fi
        sleep 0.1
        # second TERM makes wsgate skip its grace period
        [[ $i == 15 ]] && kill -TERM "$pid" 2>/dev/null || true
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
forget_pid() { local p="$1" n=() x; for x in "${STARTED[@]}"; do [[ "$x" != "$p" ]] && n+=("$x"); done; STARTED=("${n[@]}"); }
cleanup() {
    local p
    for p in "${STARTED[@]}"; do
        # nginx: its workers are children of the master we started
        for c in $(pgrep -P "$p" 2>/dev/null || true); do kill -KILL "$c" 2>/dev/null || true; done
        stop_pid "$p" KILL
    done
    [[ -n "${KEEP_WORK:-}" ]] || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_port() { # port -> 0 once it accepts (bounded: WAIT_STEPS x 0.05 s)
    local i
    for i in $(seq 1 "$WAIT_STEPS"); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    return 1
}
wait_line() { # file pattern [pid] -> prints the value after addr= (text logs) or "addr":" (JSON logs)
    # (bounded 10 s; at once when the process pid has exited, e.g. wsgate refusing its configuration)
    local i v
    for i in $(seq 1 $((WAIT_STEPS * 2))); do
        v="$(sed 's/\x1b\[[0-9;]*m//g' "$1" 2>/dev/null | grep -m1 "$2" | sed -n -E 's/.*addr(=|":")([0-9.:]+).*/\2/p' || true)"
        if [[ -n "$v" ]]; then echo "$v"; return 0; fi
        if [[ -n "${3:-}" ]] && is_gone "$3"; then return 1; fi
        sleep 0.05
    done
    return 1
}

ECHO_PID=""; ECHO_ADDR=""; ECHO_SOCK=""
start_echo() { # [target]: a variant with BENCH_WSGATE_UPSTREAM_x=unix gets an echo on a Unix socket too
    local unix=() i
    ECHO_SOCK=""
    if [[ "$(variant_var "${1:-}" UPSTREAM)" == unix ]]; then
        ECHO_SOCK="$WORK/echo.sock"; unix=(--unix "$ECHO_SOCK")
    fi
    # remove the last echo's output first: the new process truncates it only once it runs, and
    # wait_line must not read the previous (stopped) echo's address in the meantime
    rm -f "$WORK/echo.out" "$WORK/echo.err"
    "$BENCH" echo --kind "$ECHO_KIND" --listen 127.0.0.1:0 "${unix[@]}" > "$WORK/echo.out" 2> "$WORK/echo.err" &
    ECHO_PID=$!; STARTED+=("$ECHO_PID")
    ECHO_ADDR="$(wait_line "$WORK/echo.out" 'echo listening')" || { log "echo did not start"; return 1; }
    if [[ -n "$ECHO_SOCK" ]]; then
        for i in $(seq 1 "$WAIT_STEPS"); do
            grep -q 'echo listening unix=' "$WORK/echo.out" && return 0
            sleep 0.05
        done
        log "echo did not listen on $ECHO_SOCK"; return 1
    fi
}
stop_echo() { [[ -n "$ECHO_PID" ]] && { stop_pid "$ECHO_PID"; forget_pid "$ECHO_PID"; ECHO_PID=""; }; }

PROXY_PID=""; PROXY_URL=""; PROXY_NAME=""
# the load tool reads a variant's extra request headers from here (empty for every other target)
export WSGATE_BENCH_HEADERS=""
start_proxy() { # target cap(0=none)
    local t="$1" cap="$2" port dir caplines srvopts echo_port="${ECHO_ADDR##*:}"
    PROXY_NAME="$t"; PROXY_PID=""
    WSGATE_BENCH_HEADERS="$(variant_var "$t" HEADERS)"
    case "$t" in
        direct)
            PROXY_URL="ws://$ECHO_ADDR/" ;;
        wsgate|wsgate-*)
            local bin="$WSGATE" extra=() vwrap=() query="" upstream="$ECHO_ADDR"
            if [[ "$t" == wsgate-* ]]; then
                bin="$(variant_var "$t" BIN)"; bin="${bin:-$WSGATE}"
                read -r -a extra <<< "$(variant_var "$t" ENV)"
                read -r -a vwrap <<< "$(variant_var "$t" WRAP)"
                query="$(variant_var "$t" QUERY)"
                if [[ "$(variant_var "$t" UPSTREAM)" == unix ]]; then
                    [[ -n "$ECHO_SOCK" ]] || { log "$t: the echo has no Unix socket"; return 1; }
                    upstream="unix:$ECHO_SOCK"
                fi
            fi
            local clean=() v
            for v in $(compgen -e); do
                [[ "$v" == WSGATE_* || "$v" == WS_MAX_CLIENTS || "$v" == TOKIO_WORKER_THREADS ]] && clean+=(-u "$v")
            done
            # a variant's wrapper (taskset ...) goes outside valgrind, so valgrind sees wsgate itself;
            # the last wsgate's logs go first (see start_echo: no stale address may be read)
            rm -f "$WORK/wsgate.out" "$WORK/wsgate.err"
            env "${clean[@]}" WSGATE_UPSTREAM="$upstream" WSGATE_LISTEN=127.0.0.1:0 WSGATE_ADMIN_LISTEN=127.0.0.1:0 \
                WSGATE_MAX_CLIENTS="$cap" "${extra[@]}" "${vwrap[@]}" "${WRAP[@]}" "$bin" > "$WORK/wsgate.out" 2> "$WORK/wsgate.err" &
            PROXY_PID=$!; STARTED+=("$PROXY_PID")
            local a
            a="$(wait_line "$WORK/wsgate.err" 'proxy listening' "$PROXY_PID")" \
                || a="$(wait_line "$WORK/wsgate.out" 'proxy listening' "$PROXY_PID")" \
                || { log "$t did not start:"; tail -5 "$WORK/wsgate.err" >&2; return 1; }
            wait_port "${a##*:}" || { log "$t does not accept on $a"; return 1; }
            PROXY_URL="ws://$a/${query:+?$query}" ;;
        nginx)
            port="$(free_port)"; dir="$WORK/nginx"; rm -rf "$dir"; mkdir -p "$dir"
            caplines=""; [[ "$cap" != 0 ]] && caplines="limit_conn wscap $cap; limit_conn_status 503;"
            sed -e "s#@DIR@#$dir#g; s#@PORT@#$port#g; s#@ECHO_PORT@#$echo_port#g; s#@CAP_LINES@#$caplines#g" \
                -e "s#@WORKERS@#$NGX_WORKERS#g; s#@BUFFER_SIZE@#$NGX_BUF#g; s#@BUSY_LINE@#$NGX_BUSY#g" \
                "$BENCHES/conf/nginx.conf.tmpl" > "$dir/nginx.conf"
            cp "$dir/nginx.conf" "$OUT/nginx-$SETUP.cap$cap.conf"
            # under valgrind: one process, no master/worker split, so one PID holds all the work
            [[ ${#WRAP[@]} -gt 0 ]] && sed -i 's/^master_process on;/master_process off;/' "$dir/nginx.conf"
            "${WRAP[@]}" "$NGINX" -p "$dir/" -e "$dir/error.log" -c "$dir/nginx.conf" > "$dir/stdout" 2>&1 &
            PROXY_PID=$!; STARTED+=("$PROXY_PID")
            wait_port "$port" || { log "nginx did not start:"; tail -5 "$dir/error.log" >&2; return 1; }
            PROXY_URL="ws://127.0.0.1:$port/" ;;
        haproxy)
            port="$(free_port)"; dir="$WORK/haproxy"; rm -rf "$dir"; mkdir -p "$dir"
            caplines=""; srvopts=""
            if [[ "$cap" != 0 ]]; then
                caplines="http-request deny deny_status 503 if { srv_conn(be\/echo) ge $cap }"
                srvopts="maxconn $cap"
            fi
            sed -e "s#@PORT@#$port#g; s#@ECHO_PORT@#$echo_port#g; s#@CAP_LINES@#$caplines#g; s#@SERVER_OPTS@#$srvopts#g" \
                -e "s#@NBTHREAD@#$HAP_NBTHREAD#g" \
                "$BENCHES/conf/haproxy.cfg.tmpl" > "$dir/haproxy.cfg"
            cp "$dir/haproxy.cfg" "$OUT/haproxy-$SETUP.cap$cap.cfg"
            "${WRAP[@]}" "$HAPROXY" -db -f "$dir/haproxy.cfg" > "$dir/stdout" 2>&1 &
            PROXY_PID=$!; STARTED+=("$PROXY_PID")
            wait_port "$port" || { log "haproxy did not start:"; tail -5 "$dir/stdout" >&2; return 1; }
            PROXY_URL="ws://127.0.0.1:$port/" ;;
    esac
}
stop_proxy() {
    [[ -z "$PROXY_PID" ]] && return 0
    stop_pid "$PROXY_PID"; forget_pid "$PROXY_PID"; PROXY_PID=""
}

FAILS=0
size_fields() { # bench args -> ,"conns":N / ,"count":N for a line that has no figures (the report's grouping)
    local out=""
    while [[ $# -gt 0 ]]; do
        case "$1" in --conns) out+=",\"conns\":$2" ;; --count) out+=",\"count\":$2" ;; esac
        shift
    done
    printf '%s' "$out"
}
with_setup() { # JSON object line -> the same with "setup":"<current set-up>" first
    printf '{"setup":"%s",%s\n' "$SETUP" "${1#\{}"
}
# run_one round target mode cap -- bench args...
run_one() {
    local round="$1" t="$2" mode="$3" cap="$4"; shift 5
    local rc=0 line pids="" failname args=() x
    failname="$OUT/fail-r$round-$SETUP-$mode-$t.log"
    if ! start_echo "$t"; then FAILS=$((FAILS + 1)); stop_echo; return; fi
    # @ECHO_URL@ in the bench args: the echo's own URL (storm mode's clients start there)
    for x in "$@"; do args+=("${x//@ECHO_URL@/ws://$ECHO_ADDR/}"); done
    set -- "${args[@]}"
    if ! start_proxy "$t" "$cap"; then
        with_setup "$(printf '{"mode":"%s","target":"%s","round":%s%s,"ok":false,"error":"proxy did not start"}' "$mode" "$t" "$round" "$(size_fields "$@")")" >> "$RESULTS"
        case "$t" in wsgate*) cp "$WORK/wsgate.err" "$failname" 2>/dev/null || true ;; esac
        FAILS=$((FAILS + 1)); stop_proxy; stop_echo; return
    fi
    sleep 0.2
    [[ -n "$PROXY_PID" ]] && pids="--proxy-pid $PROXY_PID"
    # shellcheck disable=SC2086
    line="$(timeout 120 "$BENCH" --threads "$GEN_THREADS" "$mode" --url "$PROXY_URL" $pids --echo-pid "$ECHO_PID" \
        --target "$t" --round "$round" "$@" 2> "$WORK/bench.err")" || rc=$?
    if [[ -z "$line" ]]; then
        line="$(printf '{"mode":"%s","target":"%s","round":%s%s,"ok":false,"error":"exit %s: %s"}' \
            "$mode" "$t" "$round" "$(size_fields "$@")" "$rc" "$(head -c 200 "$WORK/bench.err" | tr -d '"\\\n')")"
    fi
    line="$(with_setup "$line")"
    echo "$line" >> "$RESULTS"
    if [[ $rc != 0 ]]; then
        FAILS=$((FAILS + 1)); log "FAILED $SETUP $mode $t: $line"
        # keep the proxy's own account of it for whoever debugs this
        case "$t" in
            wsgate*) cp "$WORK/wsgate.err" "$failname" 2>/dev/null || true ;;
            nginx) cp "$WORK/nginx/error.log" "$failname" 2>/dev/null || true ;;
            haproxy) cp "$WORK/haproxy/stdout" "$failname" 2>/dev/null || true ;;
        esac
    else
        log "ok $SETUP $mode $t: $(echo "$line" | head -c 300)"
    fi
    stop_proxy; stop_echo
}

# ---------------------------------------------------------------------------------------------
# descriptor budget: a proxied idle connection costs the proxy 2 fds (client + upstream leg)
HARD_NOFILE="$(ulimit -Hn)"
[[ "$HARD_NOFILE" == unlimited ]] && HARD_NOFILE=1048576
IDLE_MAX="${IDLE_MAX:-$(( (HARD_NOFILE - 1000) / 2 / 500 * 500 ))}"
(( IDLE_MAX > 9000 )) && IDLE_MAX=9000   # haproxy.cfg maxconn is 9900
# storm: the proxy holds 2 fds per admitted session plus one per attempt in flight (at most one
# per client not admitted): 2 x cap + (clients - cap); the echo holds the clients' connections
# until the cut's resets are read, plus the proxy's cap upstream legs; the generator one per
# client. So clients + cap + 1000 (slack) must fit the limit; if not, both scale down alike.
if (( STORM_CLIENTS + STORM_CAP + 1000 > HARD_NOFILE )); then
    f=$(( HARD_NOFILE - 1000 )); sc=$(( STORM_CLIENTS + STORM_CAP ))
    log "storm: $STORM_CLIENTS clients + cap $STORM_CAP do not fit the descriptor limit $HARD_NOFILE;" \
        "using $(( STORM_CLIENTS * f / sc )) clients, cap $(( STORM_CAP * f / sc ))"
    STORM_CLIENTS=$(( STORM_CLIENTS * f / sc )); STORM_CAP=$(( STORM_CAP * f / sc ))
fi

if [[ $SMOKE == 1 ]]; then
    LAT=(--duration 0.3); THR=(--duration 0.3 --conns 2 --inflight 4)
    HS=(--total 50 --conns 8 --max-time 20); IDLE_COUNTS=(100); CAPN=(--attempts 200 --timeout 3)
    LAT_CONNS=(1 8)
    STORM=(--max-time 20)
else
    LAT=(--duration 3); THR=(--duration 3 --conns 4 --inflight 8)
    HS=(--total "${HS_TOTAL:-3000}" --conns 64 --max-time 30); IDLE_COUNTS=(1000 4000 "$IDLE_MAX"); CAPN=(--attempts 4000 --timeout 5)
    LAT_CONNS=(1 64)
    STORM=(--max-time 60)
fi

# ---------------------------------------------------------------------------------------------
# environment record
{
    echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "cores=$(nproc)"
    echo "kernel=$(uname -r)"
    echo "nofile_hard=$HARD_NOFILE"
    echo "nginx=$([[ -n "$NGINX" ]] && "$NGINX" -v 2>&1 | sed 's/.*version: //')"
    echo "haproxy=$([[ -n "$HAPROXY" ]] && "$HAPROXY" -v 2>/dev/null | head -1 | awk '{print $3}')"
    echo "wsgate=$([[ -x "$WSGATE" ]] && "$WSGATE" --version 2>/dev/null | head -1)"
    echo "git=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || true)"
    echo "rustc=$(rustc --version 2>/dev/null || true)"
    echo "rounds=$ROUNDS"
    echo "targets=${active[*]}"
    echo "setups=${SETUPS[*]}"
    for s in "${SETUPS[@]}"; do
        setup_params "$s"
        echo "targets_$s=$(setup_targets)"
        echo "setup_$s=nginx worker_processes $NGX_WORKERS, proxy_buffer_size $NGX_BUF; haproxy nbthread $HAP_NBTHREAD; echo --kind $ECHO_KIND; generator --threads $GEN_THREADS"
    done
    echo "idle_conc=$IDLE_CONC"
    for t in "${active[@]}"; do
        [[ "$t" == wsgate-* ]] || continue
        d=""
        for k in ENV WRAP UPSTREAM BIN QUERY HEADERS SETUP; do
            v="$(variant_var "$t" "$k")"
            [[ -n "$v" ]] && d+="${d:+; }${k,,} \`${v//$'\n'/ | }\`"
        done
        echo "variant_$t=${d:-same as wsgate}"
    done
    echo "cap=$CAP"
    echo "idle_max=$IDLE_MAX"
    echo "smoke=$SMOKE"
    echo "modes=$MODES"
    echo "hs_total=${HS[1]}"
    echo "storm_clients=$STORM_CLIENTS"
    echo "storm_cap=$STORM_CAP"
} > "$OUT/env.txt"

log "targets: ${active[*]}; set-ups: ${SETUPS[*]}; rounds: $ROUNDS; results: $RESULTS"
T0=$(date +%s)
run_round() { # round: every mode for the targets of the current set-up
    local r="$1" t c n here=() order
    read -r -a here <<< "$(setup_targets)"
    [[ ${#here[@]} -gt 0 ]] || return 0
    # rotate the order each round so no target always runs first (A B C D, B C D A, ...)
    order=("${here[@]:$(( (r - 1) % ${#here[@]} ))}" "${here[@]:0:$(( (r - 1) % ${#here[@]} ))}")
    log "round $r/$ROUNDS, set-up $SETUP: ${order[*]}"
    if has_mode latency; then
        for c in "${LAT_CONNS[@]}"; do
            for t in "${order[@]}"; do run_one "$r" "$t" latency 0 -- --conns "$c" "${LAT[@]}"; done
        done
    fi
    if has_mode throughput; then for t in "${order[@]}"; do run_one "$r" "$t" throughput 0 -- "${THR[@]}"; done; fi
    if has_mode handshake; then for t in "${order[@]}"; do run_one "$r" "$t" handshake 0 -- "${HS[@]}"; done; fi
    if has_mode idle; then
        for n in "${IDLE_COUNTS[@]}"; do
            for t in "${order[@]}"; do
                [[ "$t" == direct ]] && continue   # no proxy process to weigh
                run_one "$r" "$t" idle 0 -- --count "$n" --concurrency "$IDLE_CONC" --max-time 60
            done
        done
    fi
    if has_mode cap; then
        for t in "${order[@]}"; do
            [[ "$t" == direct ]] && continue       # nothing enforces a cap
            run_one "$r" "$t" cap "$CAP" -- --cap "$CAP" "${CAPN[@]}" --max-time 30
        done
    fi
    if has_mode storm; then
        for t in "${order[@]}"; do
            [[ "$t" == direct ]] && continue       # nothing enforces a cap
            run_one "$r" "$t" storm "$STORM_CAP" -- --direct-url @ECHO_URL@ --clients "$STORM_CLIENTS" \
                --cap "$STORM_CAP" --concurrency 256 "${STORM[@]}"
        done
    fi
}
for ((r = 1; r <= ROUNDS; r++)); do
    # the set-ups alternate round by round too (ours efficient, efficient ours, ...)
    for ((k = 0; k < ${#SETUPS[@]}; k++)); do
        setup_params "${SETUPS[$(( (r - 1 + k) % ${#SETUPS[@]} ))]}"
        run_round "$r"
    done
done
log "done in $(( $(date +%s) - T0 )) s; $FAILS failed run(s); raw results: $RESULTS"

# ---------------------------------------------------------------------------------------------
# optional: instruction counts per upgrade / message / KiB under callgrind (deterministic, unlike
# the timings above). Each proxy runs under valgrind; counters are zeroed before and dumped after
# each fixed-size phase; the top functions of each phase go to $OUT/callgrind-SETUP-TARGET-PHASE.txt.
# Once per set-up (the echo, nginx's buffer size and the generator differ; nginx runs as one process).
cg_phase() { # target phase bench-args... -> prints "IR UNITS"
    local t="$1" phase="$2"; shift 2
    local before after dump line units ir i
    before="$(find "$WORK" -maxdepth 1 -name 'cg.out.*' | wc -l)"
    callgrind_control -z "$PROXY_PID" >/dev/null 2>&1 || true
    line="$(timeout 300 "$BENCH" --threads "$GEN_THREADS" "$@" --url "$PROXY_URL" --target "$t" 2>/dev/null || true)"
    callgrind_control -d "$PROXY_PID" >/dev/null 2>&1 || true
    for i in $(seq 1 100); do
        after="$(find "$WORK" -maxdepth 1 -name 'cg.out.*' | wc -l)"
        (( after > before )) && break
        sleep 0.1
    done
    dump="$(find "$WORK" -maxdepth 1 -name 'cg.out.*' -printf '%T@ %p\n' | sort -n | tail -1 | cut -d' ' -f2-)"
    ir="$(grep -m1 -E '^(summary|totals):' "$dump" 2>/dev/null | awk '{print $2}')"
    units="$(python3 -c 'import json,sys
r=json.loads(sys.argv[1]); p=sys.argv[2]
print({"handshake": r.get("upgrades", 0), "latency": r.get("msgs", 0),
       "throughput": 2 * r.get("bytes_echoed", 0) / 1024}[p] if r.get("ok") else 0)' "$line" "$phase" 2>/dev/null || echo 0)"
    python3 "$BENCHES/cg_top.py" "$dump" 30 > "$OUT/callgrind-$SETUP-$t-$phase.txt" 2>/dev/null || true
    echo "${ir:-0} ${units:-0}"
}
if [[ $CALLGRIND == 1 ]]; then
    if ! command -v valgrind >/dev/null; then
        log "installing valgrind from Debian"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null || true
    fi
    for cg_setup in "${SETUPS[@]}"; do
    setup_params "$cg_setup"
    for t in "${active[@]}"; do
        [[ "$t" == direct ]] && continue
        in_setup "$t" || continue
        log "callgrind ($SETUP): $t"
        rm -f "$WORK"/cg.out*
        if ! start_echo "$t"; then stop_echo; FAILS=$((FAILS + 1)); continue; fi
        WRAP=(valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out" -q); WAIT_STEPS=1200
        if ! start_proxy "$t" 0; then WRAP=(); WAIT_STEPS=100; stop_proxy; stop_echo; FAILS=$((FAILS + 1)); continue; fi
        WRAP=(); WAIT_STEPS=100
        # warm-up outside the counted phases (lazy initialisation, first allocations)
        "$BENCH" --threads "$GEN_THREADS" handshake --url "$PROXY_URL" --total 20 --conns 2 >/dev/null 2>&1 || true
        "$BENCH" --threads "$GEN_THREADS" latency --url "$PROXY_URL" --conns 1 --max-msgs 200 --duration 60 >/dev/null 2>&1 || true
        read -r hs_ir hs_n < <(cg_phase "$t" handshake handshake --total 300 --conns 4 --max-time 120)
        read -r lat_ir lat_n < <(cg_phase "$t" latency latency --conns 1 --max-msgs 3000 --duration 120 --max-time 150)
        read -r thr_ir thr_n < <(cg_phase "$t" throughput throughput --conns 1 --inflight 4 --max-msgs 200 --duration 120 --max-time 150)
        python3 -c 'import json,sys
a=sys.argv; f=lambda ir,n: round(float(ir)/float(n)) if float(n) > 0 and float(ir) > 0 else None
r={"mode":"callgrind","target":a[1],"ok":all(float(x)>0 for x in a[2:]),
   "ir_per_upgrade":f(a[2],a[3]),"ir_per_msg":f(a[4],a[5]),"ir_per_kib":f(a[6],a[7]),
   "upgrades":float(a[3]),"msgs":float(a[5]),"kib_proxied":float(a[7])}
print(json.dumps(r))' "$t" "$hs_ir" "$hs_n" "$lat_ir" "$lat_n" "$thr_ir" "$thr_n" > "$WORK/cg.line"
        with_setup "$(cat "$WORK/cg.line")" >> "$RESULTS"
        log "callgrind $SETUP $t: $(tail -1 "$RESULTS")"
        stop_proxy; stop_echo
    done
    done
fi

if [[ $SMOKE == 1 ]]; then
    python3 "$BENCHES/aggregate.py" --results "$OUT" --check || FAILS=$((FAILS + 1))
    if [[ $FAILS != 0 ]]; then log "smoke: $FAILS failure(s)"; exit 1; fi
    log "smoke: all modes passed"
    exit 0
fi

if [[ $USER_OUT == 1 ]]; then
    # a run into a directory of its own leaves the committed report alone
    python3 "$BENCHES/aggregate.py" --results "$OUT" --markdown "$OUT/BENCHMARKS.md" --svg "$OUT/benchmarks.svg"
    log "wrote $OUT/BENCHMARKS.md and $OUT/benchmarks.svg"
else
    python3 "$BENCHES/aggregate.py" --results "$OUT" --markdown "$ROOT/BENCHMARKS.md" --svg "$BENCHES/benchmarks.svg"
    cp "$RESULTS" "$BENCHES/last-run.jsonl"
    cp "$OUT/env.txt" "$BENCHES/last-run.env"
    if compgen -G "$OUT/callgrind-*.txt" >/dev/null; then
        rm -rf "$BENCHES/profile"; mkdir -p "$BENCHES/profile"; cp "$OUT"/callgrind-*.txt "$BENCHES/profile/"
    fi
    log "wrote $ROOT/BENCHMARKS.md and $BENCHES/benchmarks.svg"
fi
[[ $FAILS == 0 ]]
