#!/usr/bin/env python3
"""The worst overshoot of `fleet_max_clients` (docs/operations.md#fleet-wide-limits) while Redis is healthy, under churn.

Starts a private redis-server (--save '' --appendonly no, temporary --dir, free loopback port),
one echo upstream (`wsgate-bench echo`) and INSTANCES wsgate processes sharing the fleet:
`fleet_max_clients = CAP`, `fleet_timeout = 5s`, `fleet_fail_mode = closed`, no local cap. Then:

* load (one process, asyncio, raw sockets): CLIENTS concurrent clients, client i on instance
  i % INSTANCES, each looping for DURATION seconds: connect, send an upgrade request, read the
  status line and headers; on 101 hold for a random 0..HOLD_MS ms, send a masked Close frame and
  close; on 503 close at once and go again. Counts 101s, 503s, other statuses and errors.
  The load also tracks how many upgraded connections its clients hold at once (101 to close).
* sampler 1 (own process): `ZCARD {wsgate}:all` over a raw RESP socket, as fast as it answers.
* sampler 2 (own process): the sum of the instances' `wsgate_connections_active` (one keep-alive
  HTTP connection per admin port, scraped one after the other), as fast as they answer.

Reports the max of each sampler, `max - CAP` (the overshoot), how many samples were above CAP,
the instances' own counters (`wsgate_fleet_requests_total{op,result}`,
`wsgate_connections_rejected_total`), and ZCARD once the load has stopped and releases drained.
`wsgate_connections_active` is not the fleet count: wsgate reserves the local slot *before* the
fleet admission (docs/operations.md#limits-per-key and docs/operations.md#fleet-wide-limits check order) and gives it back at once on a fleet refusal, so
upgrades waiting for their Redis answer are in it; and each instance is read at a different
instant. Its sum can exceed CAP without any connection over the cap; ZCARD is the count the
admission script judges, and the one that must stay at or below CAP.

    python3 benches/fleet-overshoot.py [--instances 3] [--cap 100] [--clients 600]
                                       [--duration 30] [--hold-ms 50] [--out FILE.json]

Binaries: BENCH_WSGATE_BIN (default target/release/wsgate) and
benches/wsgate-bench/target/release/wsgate-bench. Python standard library only; loopback only;
every process it starts is stopped by PID. Exit 1 when ZCARD or the clients' own count went over CAP, or nothing was admitted.
"""
import argparse
import asyncio
import base64
import collections
import http.client
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

from fleet_common import BENCH, WSGATE, Resp, free_port, report_warnings, stop_processes, wait_line
ALL_KEY = b"{wsgate}:all"
ACTIVE = re.compile(r"^wsgate_connections_active (\S+)$", re.M)


def log(msg):
    print("[fleet-overshoot %s] %s" % (time.strftime("%H:%M:%S", time.gmtime()), msg), file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# samplers (each its own process; result: dict on the queue)

def zcard_sampler(port, stop, q):
    r = Resp(port)
    n = mx = 0
    hist = collections.Counter()
    t0 = time.monotonic()
    while not stop.is_set():
        v = r.call(b"ZCARD", ALL_KEY)
        n += 1
        hist[v] += 1
        if v > mx:
            mx = v
    el = time.monotonic() - t0
    q.put({"sampler": "zcard", "samples": n, "per_s": round(n / el), "max": mx,
           "hist": {str(k): v for k, v in sorted(hist.items())}})


def active_sampler(admins, stop, q):
    conns = {}

    def scrape(a):
        for _ in range(2):
            c = conns.get(a)
            if c is None:
                c = conns[a] = http.client.HTTPConnection(a, timeout=5)
            try:
                c.request("GET", "/metrics")
                body = c.getresponse().read().decode()
                return float(ACTIVE.search(body).group(1))
            except (OSError, http.client.HTTPException):
                c.close()
                conns.pop(a, None)
        raise RuntimeError("cannot scrape %s" % a)

    n = errors = 0
    mx, mx_parts = -1, None
    hist = collections.Counter()
    t0 = time.monotonic()
    while not stop.is_set():
        try:
            parts = [scrape(a) for a in admins]
        except RuntimeError:
            errors += 1
            time.sleep(0.01)
            continue
        s = int(sum(parts))
        n += 1
        hist[s] += 1
        if s > mx:
            mx, mx_parts = s, parts
    el = time.monotonic() - t0
    q.put({"sampler": "active_sum", "samples": n, "per_s": round(n / el), "max": mx,
           "max_parts": mx_parts, "errors": errors,
           "hist": {str(k): v for k, v in sorted(hist.items())}})


# ---------------------------------------------------------------------------------------------
# load (asyncio, raw sockets)

CLOSE_FRAME = bytes([0x88, 0x82, 1, 2, 3, 4, 0x03 ^ 1, 0xE8 ^ 2])  # masked Close, code 1000


async def client(port, stop_at, hold_s, st, live):
    key = base64.b64encode(os.urandom(16))
    req = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n") % (port, key)
    while time.monotonic() < stop_at:
        w = None
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            w.write(req)
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            status = int(head.split(b" ", 2)[1])
            st[status] += 1
            if status == 101:
                live[0] += 1
                live[1] = max(live[1], live[0])
                try:
                    await asyncio.sleep(random.uniform(0, hold_s))
                    w.write(CLOSE_FRAME)
                finally:
                    live[0] -= 1
        except Exception as e:  # noqa: BLE001 - every failure is counted by kind
            st["error " + type(e).__name__] += 1
            await asyncio.sleep(0.01)
        finally:
            if w is not None:
                w.close()
                try:
                    await asyncio.wait_for(w.wait_closed(), 2)
                except Exception:  # noqa: BLE001
                    pass


def load(ports, clients, duration, hold_ms, q):
    async def run():
        st = collections.Counter()
        live = [0, 0]  # upgraded and not yet closed by this side: now, max
        stop_at = time.monotonic() + duration
        await asyncio.gather(*(client(ports[i % len(ports)], stop_at, hold_ms / 1000.0, st, live)
                               for i in range(clients)))
        return st, live[1]
    t0 = time.monotonic()
    st, live_max = asyncio.run(run())
    q.put({"sampler": "load", "elapsed_s": round(time.monotonic() - t0, 2), "client_live_max": live_max,
           "counts": {str(k): v for k, v in st.items()}})


# ---------------------------------------------------------------------------------------------

def metric_lines(admin, prefix):
    c = http.client.HTTPConnection(admin, timeout=5)
    c.request("GET", "/metrics")
    body = c.getresponse().read().decode()
    c.close()
    return {l.rsplit(" ", 1)[0]: float(l.rsplit(" ", 1)[1]) for l in body.splitlines()
            if l.startswith(prefix)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--instances", type=int, default=3)
    ap.add_argument("--cap", type=int, default=100)
    ap.add_argument("--clients", type=int, default=600)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--hold-ms", type=float, default=50.0)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    for b in (WSGATE, BENCH):
        if not os.access(b, os.X_OK):
            sys.exit("fleet-overshoot: missing %s (build it first)" % b)

    procs = []
    work = tempfile.mkdtemp(prefix="wsgate-fleet-overshoot.")

    def start(argv, env=None, out=None, err=None):
        p = subprocess.Popen(argv, env=env, stdout=out or subprocess.DEVNULL, stderr=err or subprocess.DEVNULL)
        procs.append(p)
        return p

    result = {}
    try:
        rport = free_port()
        start(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", work], out=open(os.path.join(work, "redis.log"), "w"))
        deadline = time.monotonic() + 10
        while True:
            try:
                Resp(rport).call(b"PING")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        echo_out = os.path.join(work, "echo.out")
        ep = start([BENCH, "echo", "--listen", "127.0.0.1:0"], out=open(echo_out, "w"))
        upstream = wait_line(echo_out, "echo listening", ep)
        gates = []
        for i in range(a.instances):
            env = {k: v for k, v in os.environ.items() if not k.startswith("WSGATE_") and k != "WS_MAX_CLIENTS"}
            env.update(WSGATE_UPSTREAM=upstream, WSGATE_LISTEN="127.0.0.1:0", WSGATE_ADMIN_LISTEN="127.0.0.1:0",
                       WSGATE_MAX_CLIENTS="0", WSGATE_FLEET_REDIS_URL="redis://127.0.0.1:%d" % rport,
                       WSGATE_FLEET_MAX_CLIENTS=str(a.cap), WSGATE_FLEET_TIMEOUT="5s",
                       WSGATE_FLEET_FAIL_MODE="closed", WSGATE_FLEET_INSTANCE_ID="bench-%d" % i)
            err = os.path.join(work, "wsgate%d.err" % i)
            p = start([WSGATE], env=env, err=open(err, "w"))
            gates.append({"pid": p.pid, "err": err, "proxy": wait_line(err, "proxy listening", p),
                          "admin": wait_line(err, "admin listening", p)})
        time.sleep(0.5)
        log("redis :%d, echo %s, wsgate %s" % (rport, upstream, [g["proxy"] for g in gates]))

        ctx = mp.get_context("fork")
        stop = ctx.Event()
        q = ctx.Queue()
        samplers = [ctx.Process(target=zcard_sampler, args=(rport, stop, q)),
                    ctx.Process(target=active_sampler, args=([g["admin"] for g in gates], stop, q))]
        for s in samplers:
            s.start()
        time.sleep(0.5)
        ports = [int(g["proxy"].rsplit(":", 1)[1]) for g in gates]
        ld = ctx.Process(target=load, args=(ports, a.clients, a.duration, a.hold_ms, q))
        load_avg_start = open("/proc/loadavg").read().split()[:3]
        ld.start()
        got = {}
        # the load ends on its own (duration + the last attempts' bounded timeouts)
        r = q.get(timeout=a.duration + 60)
        got[r["sampler"]] = r
        ld.join(10)
        time.sleep(0.5)
        stop.set()
        while len(got) < 3:
            r = q.get(timeout=30)
            got[r["sampler"]] = r
        for s in samplers:
            s.join(10)
        # releases are batched by each instance's worker: give them a moment, then read ZCARD
        rr = Resp(rport)
        zc_after = None
        for _ in range(50):
            zc_after = rr.call(b"ZCARD", ALL_KEY)
            if zc_after == 0:
                break
            time.sleep(0.1)
        counters = []
        for g in gates:
            m = metric_lines(g["admin"], "wsgate_fleet_requests_total")
            m.update(metric_lines(g["admin"], "wsgate_connections_rejected_total"))
            m.update(metric_lines(g["admin"], "wsgate_connections_active"))
            m.update(metric_lines(g["admin"], "wsgate_fleet_up"))
            counters.append({k: v for k, v in m.items() if v or "fleet_requests" in k})
        zc, act = got["zcard"], got["active_sum"]
        counts = got["load"]["counts"]
        result = {
            "instances": a.instances, "cap": a.cap, "clients": a.clients, "duration_s": a.duration,
            "hold_ms": a.hold_ms, "fleet_timeout": "5s", "fleet_fail_mode": "closed",
            "upgrades_101": counts.get("101", 0), "refused_503": counts.get("503", 0),
            "other": {k: v for k, v in counts.items() if k not in ("101", "503")},
            "load_elapsed_s": got["load"]["elapsed_s"],
            # upgraded connections the clients held at once (from their 101 to their close): each
            # holds its hold from before its 101 to after its close, so this is at most ZCARD
            "client_live_max": got["load"]["client_live_max"],
            "zcard": {"max": zc["max"], "overshoot": zc["max"] - a.cap, "samples": zc["samples"],
                      "samples_per_s": zc["per_s"],
                      "samples_at_cap": zc["hist"].get(str(a.cap), 0),
                      "samples_over_cap": sum(v for k, v in zc["hist"].items() if int(k) > a.cap)},
            "active_sum": {"max": act["max"], "over_cap_by": act["max"] - a.cap, "max_parts": act["max_parts"],
                           "samples": act["samples"], "samples_per_s": act["per_s"], "errors": act["errors"],
                           "samples_over_cap": sum(v for k, v in act["hist"].items() if int(k) > a.cap)},
            "zcard_after_load": zc_after,
            "instance_counters": counters,
            "loadavg_start": load_avg_start,
            "loadavg_end": open("/proc/loadavg").read().split()[:3],
            "zcard_hist": zc["hist"], "active_sum_hist": act["hist"],
        }
    finally:
        stop_processes(procs)
        report_warnings(work, log)
        shutil.rmtree(work, ignore_errors=True)

    short = {k: v for k, v in result.items() if not k.endswith("_hist")}
    log(json.dumps(short, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            f.write(json.dumps(result) + "\n")
    print(json.dumps(short))
    ok = result["zcard"]["max"] <= a.cap and result["client_live_max"] <= a.cap and result["upgrades_101"] > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
