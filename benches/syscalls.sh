#!/usr/bin/env bash
# benches/syscalls.sh — system calls per MB echoed in the bulk mode (issue 15), wsgate beside nginx.
#
#   benches/syscalls.sh [--mb 64] [--targets "wsgate nginx"] [--no-build] [--out DIR]
#
# For each target: a fresh tokio-tungstenite echo (`wsgate-bench echo --kind tungstenite`, the
# `efficient` set-up's upstream) and a fresh proxy on 127.0.0.1 ephemeral ports: wsgate as built
# (target/release/wsgate, or BENCH_WSGATE_BIN), nginx from benches/conf/nginx.conf.tmpl with
# `worker_processes 1` + `proxy_buffer_size 16k`, haproxy (if asked for) with `nbthread 1`. After a
# short warm-up, `strace -f -C` attaches to the proxy (wsgate's threads; nginx's worker) while the
# single-threaded generator echoes a fixed number of bytes (`throughput --conns 4 --inflight 8
# --size 65536 --max-msgs N`, N from --mb). Printed (markdown), per MB of payload echoed (each
# echoed byte crosses the proxy twice): every system call by name, bytes per read-like call
# (read/recvfrom/readv returning > 0) and per write-like call (write/sendto/writev), reads that
# returned EAGAIN, epoll_wait. Raw traces and strace's own summaries go to DIR (default
# benches/results/syscalls-<time>/, git-ignored).
#
# strace slows the proxy down a lot, and a slower proxy finds more bytes waiting per read: the
# calls per MB are the proxy's pattern under strace, comparable between targets traced alike, not
# a copy of the untraced run. Everything runs on loopback; processes are stopped by PID.
set -euo pipefail

if [[ "$(nice)" == "0" && -z "${WSGATE_BENCH_NO_NICE:-}" ]]; then
    exec nice -n 10 "$0" "$@"
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCHES="$ROOT/benches"
MB=64
TARGETS="wsgate nginx"
BUILD=1
OUT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --mb) MB="$2"; shift ;;
        --targets) TARGETS="$2"; shift ;;
        --no-build) BUILD=0 ;;
        --out) OUT="$2"; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "syscalls.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
log() { printf '[syscalls.sh %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
# addr_in (the address a started process logs), shared with the variant scripts.
# shellcheck source=variant-check.sh
source "$ROOT/benches/variant-check.sh"

BENCH="$BENCHES/wsgate-bench/target/release/wsgate-bench"
WSGATE="${BENCH_WSGATE_BIN:-$ROOT/target/release/wsgate}"
if [[ $BUILD == 1 ]]; then
    (cd "$BENCHES/wsgate-bench" && cargo build --release --quiet)
    if [[ " $TARGETS " == *" wsgate "* && -z "${BENCH_WSGATE_BIN:-}" ]]; then
        (cd "$ROOT" && cargo build --release --quiet --bin wsgate)
    fi
fi
[[ -x "$BENCH" ]] || { log "missing $BENCH (run without --no-build)"; exit 1; }

need=()
command -v strace >/dev/null || need+=(strace)
[[ " $TARGETS " == *" nginx "* ]] && ! command -v nginx >/dev/null && [[ ! -x /usr/sbin/nginx ]] && need+=(nginx)
[[ " $TARGETS " == *" haproxy "* ]] && ! command -v haproxy >/dev/null && [[ ! -x /usr/sbin/haproxy ]] && need+=(haproxy)
if [[ ${#need[@]} -gt 0 ]]; then
    log "installing ${need[*]} from Debian"
    # shellcheck source=/dev/null
    source "$ROOT/.ci/apt-install.sh"
    apt_install "${need[@]}"
    for svc in "${need[@]}"; do
        [[ "$svc" == strace ]] && continue
        if command -v service >/dev/null; then service "$svc" stop >/dev/null 2>&1 || true; fi
    done
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
HAPROXY="$(command -v haproxy || echo /usr/sbin/haproxy)"

WORK="$(mktemp -d /tmp/wsgate-syscalls.XXXXXX)"
[[ -n "$OUT" ]] || OUT="$BENCHES/results/syscalls-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"
cp "$BENCH" "$WORK/wsgate-bench.bin"; BENCH="$WORK/wsgate-bench.bin"
[[ -x "$WSGATE" ]] && { cp "$WSGATE" "$WORK/wsgate.bin"; WSGATE="$WORK/wsgate.bin"; }
STARTED=()
stop_pid() { # pid [signal]: signal, wait up to 3 s, then KILL
    local pid="$1" i
    kill -"${2:-TERM}" "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    for i in $(seq 1 30); do
        kill -0 "$pid" 2>/dev/null || break
        [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" == Z ]] && break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
forget() { local n=() x; for x in "${STARTED[@]}"; do [[ "$x" != "$1" ]] && n+=("$x"); done; STARTED=("${n[@]}"); }
cleanup() {
    local p
    for p in "${STARTED[@]}"; do stop_pid "$p" KILL; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { local i; for i in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }

# 4 connections x N messages x 64 KiB = the payload echoed
PER_CONN=$(( MB * 1000000 / 4 / 65536 + 1 ))
SUMMARY_ARGS=()
for t in $TARGETS; do
    log "$t: echo + proxy"
    rm -f "$WORK/echo.out" "$WORK/wsgate.out"   # no stale address from the previous target
    "$BENCH" echo --kind tungstenite --listen 127.0.0.1:0 > "$WORK/echo.out" 2>&1 &
    echo_pid=$!; STARTED+=("$echo_pid")
    echo_addr="$(addr_in "$WORK/echo.out" 'echo listening')" || { log "echo did not start"; exit 1; }
    traced=()
    case "$t" in
        wsgate)
            clean=(); for v in $(compgen -e); do [[ "$v" == WSGATE_* || "$v" == TOKIO_WORKER_THREADS ]] && clean+=(-u "$v"); done
            env "${clean[@]}" WSGATE_UPSTREAM="$echo_addr" WSGATE_LISTEN=127.0.0.1:0 WSGATE_ADMIN_LISTEN=127.0.0.1:0 \
                "$WSGATE" > "$WORK/wsgate.out" 2>&1 &
            proxy_pid=$!; STARTED+=("$proxy_pid")
            a="$(addr_in "$WORK/wsgate.out" 'proxy listening')" || { log "wsgate did not start"; tail -5 "$WORK/wsgate.out" >&2; exit 1; }
            wait_port "${a##*:}"; url="ws://$a/"; traced=("$proxy_pid") ;;
        nginx)
            port="$(free_port)"; dir="$WORK/nginx"; rm -rf "$dir"; mkdir -p "$dir"
            sed -e "s#@DIR@#$dir#g; s#@PORT@#$port#g; s#@ECHO_PORT@#${echo_addr##*:}#g; s#@CAP_LINES@##g" \
                -e "s#@WORKERS@#1#g; s#@BUFFER_SIZE@#16k#g; s#@BUSY_LINE@#proxy_busy_buffers_size 16k;#g" "$BENCHES/conf/nginx.conf.tmpl" > "$dir/nginx.conf"
            "$NGINX" -p "$dir/" -e "$dir/error.log" -c "$dir/nginx.conf" > "$dir/stdout" 2>&1 &
            proxy_pid=$!; STARTED+=("$proxy_pid")
            wait_port "$port" || { log "nginx did not start"; tail -5 "$dir/error.log" >&2; exit 1; }
            url="ws://127.0.0.1:$port/"
            read -r -a traced <<< "$(pgrep -P "$proxy_pid" | tr '\n' ' ')" ;;   # the worker(s)
        haproxy)
            port="$(free_port)"; dir="$WORK/haproxy"; rm -rf "$dir"; mkdir -p "$dir"
            sed -e "s#@PORT@#$port#g; s#@ECHO_PORT@#${echo_addr##*:}#g; s#@CAP_LINES@##g; s#@SERVER_OPTS@##g" \
                -e "s#@NBTHREAD@#1#g" "$BENCHES/conf/haproxy.cfg.tmpl" > "$dir/haproxy.cfg"
            "$HAPROXY" -db -f "$dir/haproxy.cfg" > "$dir/stdout" 2>&1 &
            proxy_pid=$!; STARTED+=("$proxy_pid")
            wait_port "$port" || { log "haproxy did not start"; tail -5 "$dir/stdout" >&2; exit 1; }
            url="ws://127.0.0.1:$port/"; traced=("$proxy_pid") ;;
        *) log "unknown target $t"; exit 2 ;;
    esac
    [[ ${#traced[@]} -gt 0 ]] || { log "$t: no process to trace"; exit 1; }
    # warm-up outside the trace (lazy initialisation, first buffers)
    "$BENCH" --threads 0 throughput --url "$url" --conns 1 --inflight 2 --max-msgs 20 --duration 10 --max-time 20 >/dev/null 2>&1 || true
    pargs=(); for p in "${traced[@]}"; do pargs+=(-p "$p"); done
    strace -f -C -qq -s 0 -o "$OUT/strace-$t.txt" "${pargs[@]}" 2> "$WORK/strace.err" &
    strace_pid=$!; STARTED+=("$strace_pid")
    sleep 1   # attached (strace -p has no ready signal; 1 s is plenty on loopback)
    line="$(timeout 300 "$BENCH" --threads 0 throughput --url "$url" --conns 4 --inflight 8 --size 65536 \
        --max-msgs "$PER_CONN" --duration 240 --max-time 280 --target "$t" 2> "$WORK/bench.err")" \
        || { log "$t: bulk run failed: $line $(head -c 300 "$WORK/bench.err")"; exit 1; }
    stop_pid "$strace_pid" INT; forget "$strace_pid"
    echo "$line" > "$OUT/bench-$t.json"
    log "$t: $(echo "$line" | head -c 200)"
    stop_pid "$proxy_pid"; forget "$proxy_pid"
    stop_pid "$echo_pid"; forget "$echo_pid"
    SUMMARY_ARGS+=("$t")
done

python3 - "$OUT" "${SUMMARY_ARGS[@]}" <<'PY' | tee "$OUT/syscalls.md"
import json, os, re, sys
from collections import Counter, defaultdict

out, targets = sys.argv[1], sys.argv[2:]
READS, WRITES = ("read", "recvfrom", "readv", "recvmsg"), ("write", "sendto", "writev", "sendmsg")
# "PID name(args) = RET" or "PID <... name resumed>...) = RET"; "<unfinished ...>" halves are skipped
CALL = re.compile(r"^\d+\s+(?:<\.\.\. (\w+) resumed>|(\w+)\().*\)\s+=\s+(-?\d+|\?)(?:\s+(E[A-Z]+))?")
res = {}
for t in targets:
    calls, byts, pos, eagain = Counter(), Counter(), Counter(), Counter()
    summary = []
    with open(os.path.join(out, f"strace-{t}.txt"), errors="replace") as f:
        in_summary = False
        for line in f:
            if line.startswith("% time") or in_summary:
                in_summary = True
                summary.append(line)
                continue
            if "<unfinished ...>" in line:
                continue
            m = CALL.match(line)
            if not m:
                continue
            name = m.group(1) or m.group(2)
            calls[name] += 1
            ret = m.group(3)
            if ret != "?" and int(ret) > 0 and name in READS + WRITES:
                byts[name] += int(ret)
                pos[name] += 1
            if m.group(4) == "EAGAIN":
                eagain[name] += 1
    with open(os.path.join(out, f"summary-{t}.txt"), "w") as f:
        f.writelines(summary)
    r = json.load(open(os.path.join(out, f"bench-{t}.json")))
    mb = r["bytes_echoed"] / 1e6
    res[t] = dict(calls=calls, byts=byts, pos=pos, eagain=eagain, mb=mb, r=r)

def per_call(d, names):
    n = sum(d["pos"][x] for x in names)
    return sum(d["byts"][x] for x in names) / n if n else None

def f(x, nd=1):
    return "–" if x is None else (f"{x:,.0f}" if abs(x) >= 100 else f"{x:.{nd}f}")

print(f"System calls of the proxy per MB of payload echoed (bulk: 4 connections × 8 in flight × 64 KiB, "
      f"tokio-tungstenite echo, single-threaded generator; under `strace -f`):")
print()
print("| per MB echoed | " + " | ".join(targets) + " |")
print("|" + " --- |" * (len(targets) + 1))
print("| MB echoed (MB/s under strace) | " + " | ".join(
    f"{res[t]['mb']:.1f} ({res[t]['r'].get('mb_per_s', 0):.0f})" for t in targets) + " |")
print("| **all system calls** | " + " | ".join(f(sum(res[t]['calls'].values()) / res[t]['mb']) for t in targets) + " |")
names = sorted({n for t in targets for n in res[t]["calls"]},
               key=lambda n: -max(res[t]["calls"][n] / res[t]["mb"] for t in targets))
for n in names:
    vals = [res[t]["calls"][n] / res[t]["mb"] for t in targets]
    if max(vals) < 0.05 or n in ("epoll_wait", "epoll_pwait"):   # epoll_wait has its own row below
        continue
    print(f"| `{n}` | " + " | ".join(f(v, 2) for v in vals) + " |")
print("| bytes per read-like call (read/recvfrom/readv/recvmsg > 0) | " + " | ".join(
    f(per_call(res[t], READS)) for t in targets) + " |")
print("| bytes per write-like call (write/sendto/writev/sendmsg > 0) | " + " | ".join(
    f(per_call(res[t], WRITES)) for t in targets) + " |")
print("| reads returning EAGAIN | " + " | ".join(
    f(sum(res[t]["eagain"][x] for x in READS) / res[t]["mb"], 2) for t in targets) + " |")
print("| `epoll_wait` | " + " | ".join(
    f((res[t]["calls"]["epoll_wait"] + res[t]["calls"]["epoll_pwait"]) / res[t]["mb"], 2) for t in targets) + " |")
print()
print(f"Raw traces and strace's summaries: `{out}` (strace-TARGET.txt, summary-TARGET.txt).")
PY
