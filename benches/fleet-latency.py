#!/usr/bin/env python3
"""The upgrade latency added by a fleet admission (docs/operations.md#fleet-wide-limits): one Redis round trip per upgrade.

Starts one echo upstream (`wsgate-bench echo`) and two wsgate processes in front of it, side by
side for the whole measurement: `off` (fleet limits off) and `on` (`fleet_redis_url` = a local
Redis, `fleet_max_clients` = 1000000: never refuses). Then, in ROUNDS rounds with the order
alternating (off,on / on,off / ...), runs `wsgate-bench handshake --conns 1 --total PER_ROUND`
against each: sequential upgrades, each = TCP connect, upgrade request, time until the 101
(hdrhistogram in the tool), then a clean close. Reports each round's p50/p99 upgrade time, the
medians over rounds for both and their difference, and the `on` process's own
`wsgate_fleet_request_duration_seconds{op="admit"}` histogram over the measured upgrades (its
count, mean, and p50/p99 interpolated inside the buckets), plus every `wsgate_fleet_requests_total`
series. Warm-up upgrades (not counted) go to both first.

    python3 benches/fleet-latency.py [--rounds 10] [--per-round 500] [--warmup 200]
                                     [--redis-url redis://127.0.0.1:PORT] [--out FILE.json]

Without --redis-url it starts a private redis-server (--save '' --appendonly no, temporary
--dir) on a free loopback port and stops it at exit. Binaries: BENCH_WSGATE_BIN (default
target/release/wsgate) and benches/wsgate-bench/target/release/wsgate-bench (build both first).
Python standard library only; loopback only; every process it starts is stopped by PID.
"""
import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from fleet_common import BENCH, WSGATE, free_port, report_warnings, stop_processes, wait_line


def log(msg):
    print("[fleet-latency %s] %s" % (time.strftime("%H:%M:%S", time.gmtime()), msg), file=sys.stderr, flush=True)


class Procs:
    """Everything this script started, stopped by PID in reverse order."""

    def __init__(self):
        self.procs = []

    def start(self, argv, env=None, out=None, err=None):
        p = subprocess.Popen(argv, env=env, stdout=out or subprocess.DEVNULL, stderr=err or subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def stop_all(self):
        stop_processes(self.procs)


def start_wsgate(procs, work, name, upstream, extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGATE_") and k != "WS_MAX_CLIENTS"}
    env.update(WSGATE_UPSTREAM=upstream, WSGATE_LISTEN="127.0.0.1:0", WSGATE_ADMIN_LISTEN="127.0.0.1:0",
               WSGATE_MAX_CLIENTS="0")
    env.update(extra)
    err = os.path.join(work, name + ".err")
    p = procs.start([WSGATE], env=env, err=open(err, "w"))
    return {
        "name": name, "pid": p.pid, "err": err,
        "proxy": wait_line(err, "proxy listening", p),
        "admin": wait_line(err, "admin listening", p),
    }


def metrics(admin):
    with urllib.request.urlopen("http://%s/metrics" % admin, timeout=5) as r:
        return r.read().decode()


def series(text, name):
    """{labels string: value} of every sample of `name` (exact metric name)."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, val = line.rpartition(" ")
            out[key[len(name):]] = float(val)
    return out


def admit_hist(text):
    """(buckets [(le, cumulative count)], sum, count) of the admit histogram."""
    b = []
    for k, v in series(text, "wsgate_fleet_request_duration_seconds_bucket").items():
        if 'op="admit"' in k:
            le = re.search(r'le="([^"]+)"', k).group(1)
            b.append((float("inf") if le == "+Inf" else float(le), v))
    b.sort()
    s = sum(v for k, v in series(text, "wsgate_fleet_request_duration_seconds_sum").items() if 'op="admit"' in k)
    n = sum(v for k, v in series(text, "wsgate_fleet_request_duration_seconds_count").items() if 'op="admit"' in k)
    return b, s, n


def hist_quantile(buckets, q):
    """Prometheus-style histogram_quantile: linear inside the bucket."""
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return None


def handshake(url, pid, target, rnd, total):
    line = subprocess.run(
        [BENCH, "handshake", "--url", url, "--proxy-pid", str(pid), "--target", target, "--round", str(rnd),
         "--conns", "1", "--total", str(total), "--max-time", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=150,
    ).stdout.strip()
    return json.loads(line.splitlines()[-1]) if line else {"ok": False, "error": "no output"}


def med_range(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--redis-url", default="")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    for b in (WSGATE, BENCH):
        if not os.access(b, os.X_OK):
            sys.exit("fleet-latency: missing %s (build it first)" % b)

    procs = Procs()
    work = tempfile.mkdtemp(prefix="wsgate-fleet-latency.")
    try:
        redis_url = a.redis_url
        if not redis_url:
            port = free_port()
            procs.start(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                         "--appendonly", "no", "--dir", work])
            redis_url = "redis://127.0.0.1:%d" % port
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        echo_out = os.path.join(work, "echo.out")
        ep = procs.start([BENCH, "echo", "--listen", "127.0.0.1:0"], out=open(echo_out, "w"))
        upstream = wait_line(echo_out, "echo listening", ep)
        gates = {
            "off": start_wsgate(procs, work, "off", upstream, {}),
            "on": start_wsgate(procs, work, "on", upstream, {
                "WSGATE_FLEET_REDIS_URL": redis_url, "WSGATE_FLEET_MAX_CLIENTS": "1000000"}),
        }
        time.sleep(0.3)
        for g in gates.values():
            url = "ws://%s/" % g["proxy"]
            w = handshake(url, g["pid"], g["name"], 0, a.warmup)
            if not w.get("ok"):
                raise RuntimeError("warm-up against %s failed: %s" % (g["name"], w))
        before = metrics(gates["on"]["admin"])
        runs = []
        for r in range(1, a.rounds + 1):
            order = ["off", "on"] if r % 2 else ["on", "off"]
            for name in order:
                g = gates[name]
                res = handshake("ws://%s/" % g["proxy"], g["pid"], name, r, a.per_round)
                runs.append(res)
                log("round %d %s: p50 %s us p99 %s us, %s upgrades, %s failures %s" % (
                    r, name, res.get("upgrade_p50_us"), res.get("upgrade_p99_us"), res.get("upgrades"),
                    res.get("failures"), res.get("failure_kinds") or ""))
        after = metrics(gates["on"]["admin"])
        off_after = metrics(gates["off"]["admin"])
    finally:
        procs.stop_all()
        # anything wsgate logged above INFO is worth a look
        report_warnings(work, log)
        shutil.rmtree(work, ignore_errors=True)

    b0, s0, n0 = admit_hist(before)
    b1, s1, n1 = admit_hist(after)
    d = [(le, c1 - c0) for (le, c1), (_, c0) in zip(b1, b0)]
    requests = {k: v - series(before, "wsgate_fleet_requests_total").get(k, 0.0)
                for k, v in series(after, "wsgate_fleet_requests_total").items()}
    by = {n: [x for x in runs if x.get("target") == n] for n in ("off", "on")}
    summary = {
        "rounds": a.rounds, "per_round": a.per_round,
        "upgrades": {n: sum(x.get("upgrades", 0) for x in v) for n, v in by.items()},
        "failures": {n: sum(x.get("failures", 0) for x in v) for n, v in by.items()},
        "all_ok": all(x.get("ok") for x in runs),
        "p50_us": {n: med_range([x.get("upgrade_p50_us") for x in v]) for n, v in by.items()},
        "p99_us": {n: med_range([x.get("upgrade_p99_us") for x in v]) for n, v in by.items()},
        "cpu_us_per_upgrade": {n: med_range([x.get("cpu_us_per_upgrade") for x in v]) for n, v in by.items()},
        # paired by round: on minus off of the same round
        "p50_diff_us": med_range([y.get("upgrade_p50_us", 0) - x.get("upgrade_p50_us", 0)
                                  for x, y in zip(by["off"], by["on"])]),
        "p99_diff_us": med_range([y.get("upgrade_p99_us", 0) - x.get("upgrade_p99_us", 0)
                                  for x, y in zip(by["off"], by["on"])]),
        "admit_histogram": {
            "count": n1 - n0,
            "mean_us": round((s1 - s0) / (n1 - n0) * 1e6, 1) if n1 > n0 else None,
            "p50_us_interpolated": round(hist_quantile(d, 0.5) * 1e6, 1) if n1 > n0 else None,
            "p99_us_interpolated": round(hist_quantile(d, 0.99) * 1e6, 1) if n1 > n0 else None,
            # below the smallest bucket the interpolation is a straight line from 0
            "p50_bucket_le_s": next((le for le, c in d if c >= 0.5 * (n1 - n0)), None) if n1 > n0 else None,
            "p99_bucket_le_s": next((le for le, c in d if c >= 0.99 * (n1 - n0)), None) if n1 > n0 else None,
            "share_le_200us": round(next((c for le, c in d if le >= 0.0002), 0) / (n1 - n0), 4)
            if n1 > n0 else None,
            "buckets_le_s": [[("+Inf" if le == float("inf") else le), c] for le, c in d],
        },
        "fleet_requests_total": requests,
        "off_has_fleet_metrics": bool(series(off_after, "wsgate_fleet_requests_total")),
        "redis_url": redis_url,
        "loadavg": open("/proc/loadavg").read().split()[:3],
    }
    p50, p99 = summary["p50_us"], summary["p99_us"]
    log("upgrade p50 (median of %d rounds): off %s us, on %s us; p99: off %s us, on %s us" % (
        a.rounds, p50["off"]["median"], p50["on"]["median"], p99["off"]["median"], p99["on"]["median"]))
    log("paired on-off: p50 %s, p99 %s" % (summary["p50_diff_us"], summary["p99_diff_us"]))
    log("admit histogram (on): %s" % {k: v for k, v in summary["admit_histogram"].items() if k != "buckets_le_s"})
    log("fleet_requests_total delta: %s" % requests)
    out = json.dumps({"summary": summary, "runs": runs})
    if a.out:
        with open(a.out, "w") as f:
            f.write(out + "\n")
    print(json.dumps(summary))
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
