#!/usr/bin/env bash
# benches/access-log.sh — the cost of docs/operations.md#access-log's access log per upgrade, side by side (run.sh variants).
#
#   benches/access-log.sh [run.sh options]
#       = HS_TOTAL=10000 benches/run.sh --modes "handshake latency" \
#             --targets "wsgate-base wsgate wsgate-nolog wsgate-json" --setup ours [run.sh options]
#       (later options win, e.g. --rounds 1 --modes handshake --out /tmp/x --no-build);
#       then a check that the access log wrote one record per session (ACCESS_CHECK=0 skips it)
#   benches/access-log.sh --rounds 0 --callgrind --no-build --out DIR   instructions per upgrade/message/KiB
#
# Targets (all the same echo upstream, loopback, no cap; wsgate's stderr goes to a file in /tmp,
# as run.sh does for every wsgate):
#   wsgate-base   the binary from before docs/operations.md#access-log (commit 4ec9ce3): BENCH_WSGATE_BIN_base, default
#                 target/base/release/wsgate (build it from 4ec9ce3 with CARGO_TARGET_DIR=target/base;
#                 run.sh leaves the target out when it is missing)
#   wsgate        this tree, the defaults: access log on, text format (one line per session)
#   wsgate-nolog  WSGATE_ACCESS_LOG=false: no record, no SessionInfo; the sessions_ended and
#                 close_codes metrics are still counted
#   wsgate-json   WSGATE_LOG_FORMAT=json: the same record as one JSON object per session
# Handshake runs are HS_TOTAL=10000 upgrades (64 at a time) unless HS_TOTAL is set: proxy CPU is
# read in 10 ms ticks, and the access log's cost is per upgrade.
#
# The check (after run.sh, unless ACCESS_CHECK=0): run.sh keeps neither the admin address nor
# wsgate's stderr (it overwrites and then deletes it), so wsgate, wsgate-nolog and wsgate-json are
# started once more here with an admin port and their stderr in a file, driven by
# `handshake --total ACCESS_CHECK_N --conns 64` (default 10000), and then: records
# (`wsgate::access` "session" lines; JSON objects with that target under wsgate-json) are counted
# and compared with the upgrades the load tool made and with the sum of wsgate_sessions_ended_total
# scraped from /metrics. wsgate and wsgate-json must have exactly one record per upgrade,
# wsgate-nolog none, and all three one sessions_ended count per upgrade. Written to
# OUT/access-check.txt with --out (with one sample record and the records' end/closed_by counts);
# exit 1 when a count is off. Also printed, from /proc/PID/stat and /proc/PID/io over that one
# load: write-like system calls (syscw) and bytes written (wchar) per upgrade, which show the
# record's write(2), and user vs system CPU per upgrade (one run each, not a median).
set -euo pipefail

# Same niceness as run.sh gives its processes (the machine is shared).
if [[ "$(nice)" == "0" && -z "${WSGATE_BENCH_NO_NICE:-}" ]]; then
    exec nice -n 10 "$0" "$@"
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf '[access-log.sh %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# shellcheck source=variant-check.sh
source "$ROOT/benches/variant-check.sh"

export HS_TOTAL="${HS_TOTAL:-10000}"
export BENCH_WSGATE_BIN_base="${BENCH_WSGATE_BIN_base:-$ROOT/target/base/release/wsgate}"
export BENCH_WSGATE_ENV_nolog="WSGATE_ACCESS_LOG=false"
export BENCH_WSGATE_ENV_json="WSGATE_LOG_FORMAT=json"

run_variants "handshake latency" "wsgate-base wsgate wsgate-nolog wsgate-json" "$@"

[[ "${ACCESS_CHECK:-1}" == 0 ]] && exit "$rc"

# ---------------------------------------------------------------------------------------------
# the check: one record per session? (run.sh keeps no admin address and no stderr)
N="${ACCESS_CHECK_N:-10000}"
check_setup access || exit "$rc"

proc_counts() { # pid -> "utime stime syscw wchar" (ticks, ticks, calls, bytes; all threads)
    python3 -c 'import sys
st = open("/proc/%s/stat" % sys.argv[1]).read().rsplit(")", 1)[1].split()
io = dict(l.split(": ") for l in open("/proc/%s/io" % sys.argv[1]).read().splitlines())
print(st[11], st[12], io["syscw"], io["wchar"])' "$1"
}
sessions_ended() { # admin addr -> sum of wsgate_sessions_ended_total over its series
    python3 -c 'import sys, urllib.request
body = urllib.request.urlopen("http://%s/metrics" % sys.argv[1], timeout=5).read().decode()
print(int(sum(float(l.split()[-1]) for l in body.splitlines() if l.startswith("wsgate_sessions_ended_total"))))' "$1"
}
records() { # stderr file -> "COUNT" then a sample record and the end/closed_by counts (stdout)
    python3 -c 'import collections, json, re, sys
n = 0; sample = None; ends = collections.Counter()
for line in open(sys.argv[1], errors="replace"):
    line = line.rstrip("\n")
    if line.startswith("{"):
        try:
            o = json.loads(line)
        except ValueError:
            continue
        if o.get("target") != "wsgate::access" or o.get("message") != "session":
            continue
        end, by = o.get("end"), o.get("closed_by")
    elif " wsgate::access: session " in line:
        f = dict(re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", line))
        end, by = (f.get(k, "").strip(chr(34)) for k in ("end", "closed_by"))
    else:
        continue
    n += 1; sample = sample or line; ends["end=%s closed_by=%s" % (end, by)] += 1
print(n)
print("  sample: %s" % (sample or "(no record)"))
print("  " + (", ".join("%s: %d" % kv for kv in sorted(ends.items())) or "(no record)"))' "$1"
}

report=()
check_fail=0
for lbl in "" nolog json; do
    t="wsgate${lbl:+-$lbl}"
    extra=()
    if [[ -n "$lbl" ]]; then evar="BENCH_WSGATE_ENV_$lbl"; read -r -a extra <<< "${!evar}"; fi
    "$BENCH" echo --listen 127.0.0.1:0 > "$WORK/echo.out" 2>&1 &
    PIDS+=($!)
    echo_addr="$(addr_in "$WORK/echo.out" 'echo listening')" || { log "check: echo did not start"; exit 1; }
    clean=()
    for v in $(compgen -e); do [[ "$v" == WSGATE_* ]] && clean+=(-u "$v"); done
    env "${clean[@]}" WSGATE_UPSTREAM="$echo_addr" WSGATE_LISTEN=127.0.0.1:0 WSGATE_ADMIN_LISTEN=127.0.0.1:0 \
        WSGATE_MAX_CLIENTS=0 "${extra[@]}" "$WSGATE" > "$WORK/wsgate.out" 2> "$WORK/wsgate.err" &
    PIDS+=($!)
    proxy="$(addr_in "$WORK/wsgate.err" 'proxy listening')" || { log "check: $t did not start"; exit 1; }
    admin="$(addr_in "$WORK/wsgate.err" 'admin listening')" || { log "check: no admin address"; exit 1; }
    wpid="${PIDS[-1]}"
    before="$(proc_counts "$wpid")"
    hs="$("$BENCH" handshake --url "ws://$proxy/" --total "$N" --conns 64 --max-time 60 --target "$t" 2>/dev/null || true)"
    upgrades="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1] or "{}").get("upgrades", 0))' "$hs")"
    # the last sessions end just after the load tool saw their Close: wait for the counter (≤ 10 s)
    ended=0
    for _ in $(seq 1 100); do
        ended="$(sessions_ended "$admin" || echo 0)"
        (( ended >= upgrades )) && break
        sleep 0.1
    done
    sleep 0.2
    ended="$(sessions_ended "$admin" || echo 0)"
    after="$(proc_counts "$wpid")"
    per="$(python3 -c 'import sys
b, a, n = [int(x) for x in sys.argv[1].split()], [int(x) for x in sys.argv[2].split()], max(1, int(sys.argv[3]))
tck = int(sys.argv[4])
print("per upgrade: %.2f write-like system calls, %.0f bytes written, CPU %.0f us user + %.0f us system (one run, %d ms ticks)" % (
    (a[2] - b[2]) / n, (a[3] - b[3]) / n, (a[0] - b[0]) * 1e6 / tck / n, (a[1] - b[1]) * 1e6 / tck / n, 1000 // tck))' \
        "$before" "$after" "$upgrades" "$(getconf CLK_TCK)")"
    out="$(records "$WORK/wsgate.err")"
    n="$(head -1 <<< "$out")"
    want="$upgrades"; [[ "$lbl" == nolog ]] && want=0
    line="# $t (${extra[*]:-defaults}): upgrades $upgrades, wsgate_sessions_ended_total $ended, access records $n (want $want)"
    report+=("$line" "  $per" "$(tail -n +2 <<< "$out")")
    if [[ "$upgrades" == 0 || "$ended" != "$upgrades" || "$n" != "$want" ]]; then
        check_fail=1; log "check FAILED: ${line#\# }"
    else
        log "check ok: ${line#\# }"
    fi
    stop_all
done
printf '%s\n' "${report[@]}" >&2
[[ -n "$OUT" && -d "$OUT" ]] && printf '%s\n' "${report[@]}" > "$OUT/access-check.txt"
[[ $check_fail == 0 ]] || rc=1
exit "$rc"
