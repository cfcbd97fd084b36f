#!/usr/bin/env python3
"""The measured cost model of the fleet store (docs/operations.md#cost-model): Redis CPU and memory
per hold at 10 k, 100 k and 1 M holds, the fleet one Redis primary (or a Cluster) carries at a CPU
budget, and a prototype of per-instance counts measured beside it.

For each size N a private redis-server (a free loopback port, no persistence, a temporary --dir,
stopped by PID at exit, Ctrl-C and errors included) is started fresh, the fleet-wide set
`{bench}:all` is filled with N holds by synthetic instances of 10,000 holds each (RENEW calls of
1,000, as the worker sends them), and then, with the two scripts loaded exactly as
src/fleet/scripts.rs has them:

  admission    ADMIT one at a time against the set of N holds: one scope ({bench}:all), and total +
               one key scope (a key set of 1,000 holds); one scope again in pipelines of 100
  renewal      every hold of the set renewed in RENEW calls of 1,000 (the worker's chunk), and
               calls of 1 hold (the fixed cost of a call); a key set of 1,000 holds in one call
  release      ZREM of 100 holds per command in one pipeline, and of 1 hold per round trip
  memory       INFO memory used_memory before and after the fill, per hold; key-rule holds in
               sets of 50 (small sets are listpacks)

Each is measured REPS times, from INFO commandstats (the command's own usec) and from the server
process's CPU (INFO cpu used_cpu_user + used_cpu_sys, which includes reading and parsing the
protocol and writing the reply; the idle server's own rate is measured first and subtracted); the
process's /proc/<pid>/stat utime+stime over all repetitions is printed as a cross-check. Holds are
given a lease of one hour so that none expires while the bench runs (the scripts' work does not
depend on the lease's value).

Then the counts prototype (PROTOTYPE, NOT SHIPPED; the Lua below is not in src/): per-instance
counts in a hash with a running total, an expiry zset of instances, one atomic admission script
that drops dead instances, checks and increments its own field, one renewal call per instance per
interval that sets its field to its true local count. Measured at the same session counts with
10, 100 and 1,000 instances.

Last, the model: the largest fleet S whose Redis work fits the CPU budget (default 50 % of one
core) of one primary and of an N-node Cluster, from the medians measured above, with the
assumptions printed beside it.

    python3 benches/fleet-cost-model.py            # 10 k, 100 k and 1 M holds (~2 min on 2 cores)
    python3 benches/fleet-cost-model.py --quick    # 10 k and 100 k only (~1 min)
    options: --sizes 10000,100000 --instances 10,100,1000 --reps 5 --calls 2000 --json FILE
             --lease 30 --session-minutes 10 --storm-fraction 0.1 --storm-seconds 10
             --budget 0.5 --cluster-nodes 3
"""
import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from fleet_common import ROOT, Resp, encode, free_port, stop_processes

SRC = open(os.path.join(ROOT, "src/fleet/scripts.rs")).read()
ADMIT = re.search(r'const ADMIT: &str = r"(.*?)";', SRC, re.S).group(1)
RENEW = re.search(r'const RENEW: &str = r"(.*?)";', SRC, re.S).group(1)

ALL = "{bench}:all"
KEYSET = "{bench}:key:tenant:t0"
BENCH_LEASE = 3_600_000  # ms: no hold expires during a run
CHUNK = 1000  # src/fleet/worker.rs RENEW_CHUNK
PER_INSTANCE = 10_000  # holds per synthetic instance
BIG = 10**9  # a limit nothing reaches

# ---------------------------------------------------------------------------------------------
# PROTOTYPE, NOT SHIPPED: per-instance counts with heartbeats. Nothing in src/ runs these.
#
# KEYS[1]: the instances' expiry zset (instance -> heartbeat expiry, ms of the server's clock).
# KEYS[2]: the fleet-wide counts hash: one field per instance (its count) and ':total' (their sum,
#          kept by every script that changes a field, so an admission reads one field).
# KEYS[3..]: key-scope counts hashes (one field per instance, no total): summed at admission,
#          dropping the fields of instances no longer in KEYS[1] (a dead instance's key counts are
#          only found when their key is next touched).
# ---------------------------------------------------------------------------------------------
COUNTS_PRELUDE = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local inst = KEYS[1]
local dead = redis.call('ZRANGEBYSCORE', inst, '-inf', now)
if #dead > 0 then
  for _, d in ipairs(dead) do
    local c = tonumber(redis.call('HGET', KEYS[2], d) or '0')
    if c ~= 0 then redis.call('HINCRBY', KEYS[2], ':total', -c) end
    redis.call('HDEL', KEYS[2], d)
  end
  redis.call('ZREMRANGEBYSCORE', inst, '-inf', now)
end
"""

# ARGV[1]: lease ms; ARGV[2]: instance; ARGV[3]: 'total' (read ':total') or 'sum' (add up every
# field of KEYS[2]: O(instances)); ARGV[2 + i]: the limit of KEYS[i], i >= 2. Returns {full, count}.
COUNTS_ADMIT = COUNTS_PRELUDE + r"""
local ttl = tonumber(ARGV[1])
local me = ARGV[2]
local full = 0
local first = 0
for i = 2, #KEYS do
  local n = 0
  if i == 2 and ARGV[3] == 'total' then
    n = tonumber(redis.call('HGET', KEYS[2], ':total') or '0')
  else
    local kv = redis.call('HGETALL', KEYS[i])
    for j = 1, #kv, 2 do
      local f = kv[j]
      if f ~= ':total' then
        if i == 2 then
          n = n + tonumber(kv[j + 1])
        else
          local s = redis.call('ZSCORE', inst, f)
          if s and tonumber(s) > now then
            n = n + tonumber(kv[j + 1])
          else
            redis.call('HDEL', KEYS[i], f)
          end
        end
      end
    end
  end
  if i == 2 then first = n end
  if full == 0 and n >= tonumber(ARGV[2 + i]) then full = i - 1 end
end
if full == 0 then
  for i = 2, #KEYS do
    redis.call('HINCRBY', KEYS[i], me, 1)
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
  redis.call('HINCRBY', KEYS[2], ':total', 1)
  redis.call('ZADD', inst, now + ttl, me)
  first = first + 1
end
return {full, first}
"""

# ARGV[1]: lease ms; ARGV[2]: instance; ARGV[1 + i]: the instance's true local count in KEYS[i]
# (i >= 2; admissions in flight included). Returns the fleet-wide total.
COUNTS_RENEW = COUNTS_PRELUDE + r"""
local ttl = tonumber(ARGV[1])
local me = ARGV[2]
redis.call('ZADD', inst, now + ttl, me)
for i = 2, #KEYS do
  local c = tonumber(ARGV[1 + i])
  if i == 2 then
    local old = tonumber(redis.call('HGET', KEYS[2], me) or '0')
    if c ~= old then redis.call('HINCRBY', KEYS[2], ':total', c - old) end
  end
  if c > 0 then redis.call('HSET', KEYS[i], me, c) else redis.call('HDEL', KEYS[i], me) end
  redis.call('PEXPIRE', KEYS[i], ttl)
end
return tonumber(redis.call('HGET', KEYS[2], ':total') or '0')
"""

# ARGV[1]: instance; ARGV[i]: how many of its sessions in KEYS[i] ended since the last release
# call (i >= 2): one call per flush, whatever the number released.
COUNTS_RELEASE = r"""
local me = ARGV[1]
for i = 2, #KEYS do
  local r = tonumber(ARGV[i])
  if r > 0 then
    local v = redis.call('HINCRBY', KEYS[i], me, -r)
    if i == 2 then redis.call('HINCRBY', KEYS[2], ':total', -r) end
    if v <= 0 then
      redis.call('HDEL', KEYS[i], me)
      if i == 2 and v < 0 then redis.call('HINCRBY', KEYS[2], ':total', -v) end
    end
  end
end
return 0
"""

CINST = "{cnt}:instances"
CALL = "{cnt}:all"
CKEY = "{cnt}:key:tenant:t0"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Server:
    """A private redis-server on a free loopback port, stopped by PID."""

    def __init__(self, tmp):
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", tmp, "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                self.c = Resp(self.port)
                self.c.call("PING")
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.05)
        self.idle_rate = 0.0
        self.proc_ticks = 0

    def stop(self):
        stop_processes([self.proc])

    def cpu(self):
        """The process's CPU seconds so far (getrusage via INFO cpu)."""
        info = self.c.call("INFO", "cpu").decode()
        u = float(re.search(r"used_cpu_user:([0-9.]+)", info).group(1))
        s = float(re.search(r"used_cpu_sys:([0-9.]+)", info).group(1))
        return u + s

    def stat_ticks(self):
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    def used_memory(self):
        info = self.c.call("INFO", "memory").decode()
        return int(re.search(r"used_memory:(\d+)", info).group(1))

    def commandstats(self, cmd):
        info = self.c.call("INFO", "commandstats").decode()
        m = re.search(r"cmdstat_%s:calls=(\d+),usec=(\d+)" % cmd, info)
        return (int(m.group(1)), int(m.group(2))) if m else (0, 0)

    def measure_idle(self, seconds=2.0):
        c0, t0 = self.cpu(), time.monotonic()
        time.sleep(seconds)
        self.idle_rate = (self.cpu() - c0) / (time.monotonic() - t0)

    def measure(self, cmd, units, work):
        """Runs work() once; returns (commandstats usec per unit, process CPU usec per unit)."""
        self.c.call("CONFIG", "RESETSTAT")
        ticks0 = self.stat_ticks()
        cpu0, t0 = self.cpu(), time.monotonic()
        work()
        cpu1, t1 = self.cpu(), time.monotonic()
        self.proc_ticks += self.stat_ticks() - ticks0
        _, usec = self.commandstats(cmd)
        busy = (cpu1 - cpu0) - self.idle_rate * (t1 - t0)
        return usec / units, busy * 1e6 / units


def sequential(c, cmds):
    """One command per round trip."""
    def work():
        for cmd in cmds:
            c.s.sendall(cmd)
            c.read()
    return work


def pipelined(c, cmds, depth):
    def work():
        for i in range(0, len(cmds), depth):
            part = cmds[i:i + depth]
            c.s.sendall(b"".join(part))
            for _ in part:
                c.read()
    return work


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": values}


def member(inst, n):
    # A Kubernetes pod's default fleet_instance_id (host name + 8 hex digits) and a counter.
    return "wsgate-7d9f8c6b5d-i%05d-%08x:%d" % (inst, inst * 2654435761 % 2**32, n)


def renew_cmds(sha, key, members, chunk):
    return [encode("EVALSHA", sha, 1, key, BENCH_LEASE, 1, len(members[i:i + chunk]),
                   *members[i:i + chunk]) for i in range(0, len(members), chunk)]


def run_holds(tmp, n, a):
    srv = Server(tmp)
    try:
        c = srv.c
        admit = c.call("SCRIPT", "LOAD", ADMIT).decode()
        renew = c.call("SCRIPT", "LOAD", RENEW).decode()
        mem0 = srv.used_memory()
        members = [member(i // PER_INSTANCE, i % PER_INSTANCE) for i in range(n)]
        fill = renew_cmds(renew, ALL, members, CHUNK)
        t0 = time.monotonic()
        pipelined(c, fill, 1)()
        assert c.call("ZCARD", ALL) == n
        mem1 = srv.used_memory()
        log("  %d holds in %s by %d synthetic instance(s): %.1f s" % (
            n, ALL, max(1, n // PER_INSTANCE), time.monotonic() - t0))
        key_members = ["wsgate-7d9f8c6b5d-k%05d-0000beef:%d" % (i, i) for i in range(1000)]
        pipelined(c, renew_cmds(renew, KEYSET, key_members, CHUNK), 1)()
        # Key-rule holds in sets of 50 (listpacks): memory only, then gone.
        m0 = srv.used_memory()
        small = []
        for s in range(200):
            ms = ["wsgate-7d9f8c6b5d-s%05d-0000cafe:%d" % (s, i) for i in range(50)]
            small += renew_cmds(renew, "{bench}:key:small:v%d" % s, ms, CHUNK)
        pipelined(c, small, 100)()
        key_bytes = (srv.used_memory() - m0) / 10_000
        c.call("DEL", *["{bench}:key:small:v%d" % s for s in range(200)])

        srv.measure_idle()
        res = {"holds": n, "bytes_per_hold": (mem1 - mem0) / n, "bytes_per_key_hold_sets_of_50": key_bytes,
               "idle_cpu_share": srv.idle_rate}
        rows = {k: ([], []) for k in ("admit_1", "admit_2", "admit_1_pipe100", "renew_1000",
                                      "renew_1", "renew_keyset_1000", "release_100", "release_1")}

        def add(name, pair):
            rows[name][0].append(pair[0])
            rows[name][1].append(pair[1])

        calls = a.calls
        for rep in range(a.reps):
            for name, keys in (("admit_1", [ALL]), ("admit_2", [ALL, KEYSET])):
                mem = ["adm-%s-%d-%d" % (name, rep, i) for i in range(calls)]
                cmds = [encode("EVALSHA", admit, len(keys), *keys, BENCH_LEASE, m, 0, *([BIG] * len(keys)))
                        for m in mem]
                add(name, srv.measure("evalsha", calls, sequential(c, cmds)))
                for k in keys:
                    c.pipeline([("ZREM", k, *mem[i:i + 500]) for i in range(0, calls, 500)])
            mem = ["adm-pipe-%d-%d" % (rep, i) for i in range(calls * 5)]
            cmds = [encode("EVALSHA", admit, 1, ALL, BENCH_LEASE, m, 0, BIG) for m in mem]
            add("admit_1_pipe100", srv.measure("evalsha", len(cmds), pipelined(c, cmds, 100)))
            c.pipeline([("ZREM", ALL, *mem[i:i + 500]) for i in range(0, len(mem), 500)])

            add("renew_1000", srv.measure("evalsha", n, sequential(c, fill)))
            one = renew_cmds(renew, ALL, members[:calls], 1)
            add("renew_1", srv.measure("evalsha", len(one), sequential(c, one)))
            keyset = renew_cmds(renew, KEYSET, key_members, CHUNK) * 20
            add("renew_keyset_1000", srv.measure("evalsha", 20 * 1000, sequential(c, keyset)))

            r = min(10_000, n // 2)
            gone = members[rep * r % n:][:r]
            cmds = [encode("ZREM", ALL, *gone[i:i + 100]) for i in range(0, len(gone), 100)]
            add("release_100", srv.measure("zrem", len(gone), pipelined(c, cmds, len(cmds))))
            pipelined(c, renew_cmds(renew, ALL, gone, CHUNK), 1)()
            gone = gone[:calls]
            cmds = [encode("ZREM", ALL, m) for m in gone]
            add("release_1", srv.measure("zrem", len(gone), sequential(c, cmds)))
            pipelined(c, renew_cmds(renew, ALL, gone, CHUNK), 1)()
            assert c.call("ZCARD", ALL) == n
            log("  rep %d/%d done" % (rep + 1, a.reps))
        for name, (stats_us, cpu_us) in rows.items():
            res[name] = {"commandstats_us": summary(stats_us), "cpu_us": summary(cpu_us)}
        res["proc_stat_cpu_s"] = srv.proc_ticks / os.sysconf("SC_CLK_TCK")
        res["used_memory_total"] = srv.used_memory()
        return res
    finally:
        srv.stop()


def inst_name(i):
    return "wsgate-7d9f8c6b5d-i%05d-%08x" % (i, i * 2654435761 % 2**32)


def run_counts(srv, n, instances, a):
    """The counts prototype at n sessions over `instances` instances."""
    c = srv.c
    sha = {k: c.call("SCRIPT", "LOAD", s).decode()
           for k, s in (("admit", COUNTS_ADMIT), ("renew", COUNTS_RENEW), ("release", COUNTS_RELEASE))}
    c.call("DEL", CINST, CALL, CKEY)
    mem0 = srv.used_memory()
    names = [inst_name(i) for i in range(instances)]
    per = n // instances
    exp = (int(time.time()) * 1000) + BENCH_LEASE
    for i in range(0, instances, 500):
        part = names[i:i + 500]
        c.call("ZADD", CINST, *[x for nm in part for x in (exp, nm)])
        c.call("HSET", CALL, *[x for nm in part for x in (nm, per)])
        c.call("HSET", CKEY, *[x for nm in part for x in (nm, 1)])
    c.call("HSET", CALL, ":total", per * instances)
    mem = (srv.used_memory() - mem0) / instances
    rows = {k: ([], []) for k in ("admit_total", "admit_sum", "admit_total_key", "renew_call", "release_call")}
    calls = a.calls
    for _ in range(a.reps):
        for name, keys, mode in (("admit_total", [CINST, CALL], "total"), ("admit_sum", [CINST, CALL], "sum"),
                                 ("admit_total_key", [CINST, CALL, CKEY], "total")):
            cmds = [encode("EVALSHA", sha["admit"], len(keys), *keys, BENCH_LEASE, names[i % instances], mode,
                           *([BIG] * (len(keys) - 1))) for i in range(calls)]
            r = srv.measure("evalsha", calls, sequential(c, cmds))
            rows[name][0].append(r[0])
            rows[name][1].append(r[1])
        # Renewal intervals: every instance sets its own count, one call each (at least `calls`
        # calls, so that 10 instances are measured over more than 10 calls).
        cmds = [encode("EVALSHA", sha["renew"], 2, CINST, CALL, BENCH_LEASE, nm, per) for nm in names]
        cmds = cmds * max(1, calls // instances)
        r = srv.measure("evalsha", len(cmds), sequential(c, cmds))
        rows["renew_call"][0].append(r[0])
        rows["renew_call"][1].append(r[1])
        cmds = [encode("EVALSHA", sha["release"], 2, CINST, CALL, names[i % instances], 1) for i in range(calls)]
        r = srv.measure("evalsha", calls, sequential(c, cmds))
        rows["release_call"][0].append(r[0])
        rows["release_call"][1].append(r[1])
    out = {"sessions": n, "instances": instances, "bytes_per_instance": mem}
    for name, (stats_us, cpu_us) in rows.items():
        out[name] = {"commandstats_us": summary(stats_us), "cpu_us": summary(cpu_us)}
    return out


# ------------------------------------------------------------------------------------ the model
def interp(points, n):
    """Piecewise linear in log10(n) through (holds, cost) points; the end segments extended."""
    pts = sorted((math.log10(h), y) for h, y in points)
    if len(pts) == 1:
        return pts[0][1]
    x = math.log10(n)
    i = 0
    while i < len(pts) - 2 and x > pts[i + 1][0]:
        i += 1
    (x0, y0), (x1, y1) = pts[i], pts[i + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def largest(load, budget_us):
    """The largest S (sessions) with load(S) <= budget_us (load rises with S)."""
    lo, hi = 1.0, 1e10
    if load(lo) > budget_us:
        return 0
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if load(mid) <= budget_us:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1.0001:
            break
    return lo


def model(holds, counts, a):
    med = lambda r, k: r[k]["cpu_us"]["median"]
    pts = lambda k: [(r["holds"], med(r, k)) for r in holds]
    c_renew = lambda s: interp(pts("renew_1000"), s)
    c_admit1 = lambda s: interp(pts("admit_1"), s)
    c_scope = lambda s: max(0.0, interp(pts("admit_2"), s) - interp(pts("admit_1"), s))
    c_rel = lambda s: interp(pts("release_100"), s)
    smallest = min(r["holds"] for r in holds)
    c_renew_key = statistics.median(med(r, "renew_keyset_1000") for r in holds)
    c_renew_call1 = statistics.median(med(r, "renew_1") for r in holds)
    c_admit_small = interp(pts("admit_1"), smallest)
    interval = a.lease / 3
    steady = 1 / (a.session_minutes * 60)
    storm = a.storm_fraction / a.storm_seconds
    budget = a.budget * 1e6

    def holds_load(s, k, rate, part="single", nodes=1):
        """µs of Redis CPU per second for s sessions with k fleet rules, `rate` admissions (and as
        many releases) per session per second: on one primary ("single"), on the Cluster node that
        holds {ns}:all and its share of the key slots ("cluster"), or on one of `nodes` when only
        key rules count ("keys"). On a Cluster a key scope is a call of its own (slot groups)."""
        all_part = (s * c_renew(s) / interval + s * rate * (c_admit1(s) + c_rel(s)))
        if part == "single":
            return all_part + k * (s * c_renew_key / interval + s * rate * (c_scope(s) + c_rel(s)))
        key_part = k * (s * c_renew_key / interval + s * rate * (c_admit_small + c_rel(s))) / nodes
        if part == "cluster":
            return all_part + key_part
        return key_part  # key rules only, no fleet_max_clients

    out = {"assumptions": {
        "lease_s": a.lease, "renewal_interval_s": interval, "session_minutes": a.session_minutes,
        "storm": "%g of the fleet reconnecting in %g s" % (a.storm_fraction, a.storm_seconds),
        "budget_share_of_one_core": a.budget, "cluster_nodes": a.cluster_nodes,
        "admissions_per_session_per_s": {"steady": steady, "storm": steady + storm}}}
    cap = {}
    for k in (0, 1, 2):
        for label, rate in (("steady", steady), ("storm", steady + storm)):
            cap["single k=%d %s" % (k, label)] = largest(lambda s: holds_load(s, k, rate), budget)
            cap["cluster k=%d %s" % (k, label)] = largest(
                lambda s: holds_load(s, k, rate, "cluster", a.cluster_nodes), budget)
            if k:
                cap["cluster keys-only k=%d %s" % (k, label)] = largest(
                    lambda s: holds_load(s, k, rate, "keys", a.cluster_nodes), budget)
    # A Cluster whose key values each sit in their own slot renews key holds in calls of few holds:
    # the worst case is one hold per call.
    for label, rate in (("steady", steady), ("storm", steady + storm)):
        cap["cluster keys-only k=1 %s, 1 hold per renewal call" % label] = largest(
            lambda s: (s * c_renew_call1 / interval + s * rate * (c_admit_small + c_rel(s))) / a.cluster_nodes,
            budget)
    out["holds_capacity_sessions"] = cap

    # Is the per-hold renewal cost flat in N? A least-squares line in log10(N), and 10 M sessions.
    xs = [math.log10(r["holds"]) for r in holds]
    ys = [med(r, "renew_1000") for r in holds]
    if len(xs) > 1:
        mx, my = statistics.mean(xs), statistics.mean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    else:
        slope, mx, my = 0.0, xs[0], ys[0]
    at = lambda n: my + slope * (math.log10(n) - mx)
    ten_m = 10_000_000
    mem_pts = [(r["holds"], r["bytes_per_hold"]) for r in holds]
    out["extrapolation"] = {
        "renew_us_per_hold_slope_per_decade": slope,
        "renew_us_per_hold_at_10M": at(ten_m),
        "renewal_core_share_at_10M": ten_m * at(ten_m) / interval / 1e6,
        "steady_core_share_at_10M": ten_m * (at(ten_m) / interval
                                             + steady * (interp(pts("admit_1"), ten_m) + interp(pts("release_100"), ten_m))) / 1e6,
        "storm_core_share_at_10M": ten_m * (at(ten_m) / interval + (steady + storm) * (
            interp(pts("admit_1"), ten_m) + interp(pts("release_100"), ten_m))) / 1e6,
        # Bytes per hold fall towards a constant as the set's fixed overhead is shared: the largest
        # measured set's figure, not a line through the points.
        "memory_GB_at_10M": ten_m * max(mem_pts)[1] / 1e9,
    }
    if counts:
        cm = lambda k: statistics.median(r[k]["cpu_us"]["median"] for r in counts)
        by_inst = {}
        for r in counts:
            by_inst.setdefault(r["instances"], []).append(r)
        renew_call = cm("renew_call")
        admit_total = cm("admit_total")
        release_call = cm("release_call")
        ccap = {}
        for label, rate in (("steady", steady), ("storm", steady + storm)):
            # Instances = S / 10,000; releases batched, one call per instance per renewal interval
            # at least (a conservative stand-in for one call per flush).
            ccap[label] = largest(lambda s: (s / PER_INSTANCE) * (renew_call + release_call) / interval
                                  + s * rate * admit_total, budget)
        out["counts_capacity_sessions"] = ccap
        out["counts_per_instance_interval_us"] = {
            str(i): statistics.median(r["renew_call"]["cpu_us"]["median"] for r in rs) * i
            for i, rs in sorted(by_inst.items())}
    return out


# ------------------------------------------------------------------------------------ printing
def fmt(s, digits=2):
    return "%.*f (%.*f..%.*f)" % (digits, s["median"], digits, s["min"], digits, s["max"])


def report(holds, counts, m, a, env):
    P = print
    P("# fleet store cost model (%s)" % env["date"])
    P("redis %s, %s cores, load before: %s; %d repetitions, %d calls per admission measurement" % (
        env["redis"], env["cores"], env["load_before"], a.reps, a.calls))
    P("Redis CPU in µs: process CPU (INFO cpu, idle rate subtracted) / INFO commandstats; median (min..max)")
    P("")
    P("| holds in {ns}:all | admission, 1 scope | admission, total + 1 key | admission, 1 scope, pipelined 100 "
      "| renewal per hold (calls of 1,000) | renewal, calls of 1 hold | release per hold (ZREM of 100) "
      "| release, 1 per round trip | bytes per hold |")
    P("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in holds:
        cell = lambda k, d=1: "%s / %s" % (fmt(r[k]["cpu_us"], d), "%.*f" % (d, r[k]["commandstats_us"]["median"]))
        P("| %s | %s | %s | %s | %s | %s | %s | %s | %.0f |" % (
            "{:,}".format(r["holds"]), cell("admit_1"), cell("admit_2"), cell("admit_1_pipe100"),
            cell("renew_1000", 2), cell("renew_1"), cell("release_100", 2), cell("release_1"),
            r["bytes_per_hold"]))
    P("")
    for r in holds:
        P("%s holds: key-set renewal (1,000 holds in one call) %s µs per hold; key-rule holds in sets of 50: "
          "%.0f bytes per hold; idle server %.3f %% of a core; /proc utime+stime over the run %.2f s; "
          "used_memory at the end %.1f MB" % (
              "{:,}".format(r["holds"]), fmt(r["renew_keyset_1000"]["cpu_us"]), r["bytes_per_key_hold_sets_of_50"],
              100 * r["idle_cpu_share"], r["proc_stat_cpu_s"], r["used_memory_total"] / 1e6))
    if counts:
        P("")
        P("counts prototype (NOT SHIPPED), µs of Redis process CPU / commandstats:")
        P("| sessions | instances | admission, running total | admission, summing fields "
          "| admission, total + 1 key (a field per instance) | renewal call (one per instance per interval) "
          "| renewal of all instances, per interval | release call | bytes per instance |")
        P("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in counts:
            cell = lambda k: "%s / %.1f" % (fmt(r[k]["cpu_us"], 1), r[k]["commandstats_us"]["median"])
            P("| %s | %s | %s | %s | %s | %s | %.2f ms | %s | %.0f |" % (
                "{:,}".format(r["sessions"]), "{:,}".format(r["instances"]), cell("admit_total"), cell("admit_sum"),
                cell("admit_total_key"), cell("renew_call"),
                r["renew_call"]["cpu_us"]["median"] * r["instances"] / 1000, cell("release_call"),
                r["bytes_per_instance"]))
    P("")
    P("model: %s" % json.dumps(m["assumptions"]))
    for k, v in m["holds_capacity_sessions"].items():
        P("  holds, %s: S <= %s" % (k, "{:,.0f}".format(v)))
    for k, v in m.get("counts_capacity_sessions", {}).items():
        P("  counts prototype, %s: S <= %s" % (k, "{:,.0f}".format(v)))
    for k, v in m.get("counts_per_instance_interval_us", {}).items():
        P("  counts prototype, renewal of %s instances: %.0f µs per interval" % (k, v))
    for k, v in m["extrapolation"].items():
        P("  %s: %.3f" % (k, v))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="10 k and 100 k holds only")
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--instances", default="10,100,1000")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--json")
    p.add_argument("--lease", type=float, default=30.0, help="fleet_lease_ttl in s (renewal every lease / 3)")
    p.add_argument("--session-minutes", type=float, default=10.0)
    p.add_argument("--storm-fraction", type=float, default=0.1)
    p.add_argument("--storm-seconds", type=float, default=10.0)
    p.add_argument("--budget", type=float, default=0.5, help="share of one core")
    p.add_argument("--cluster-nodes", type=int, default=3)
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    if a.quick:
        sizes = [s for s in sizes if s <= 100_000]
    insts = [int(s) for s in a.instances.split(",")]
    # Stop the servers (by PID, in the finally blocks) on SIGTERM, and on SIGINT even when the shell
    # started this in the background with SIGINT ignored.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    env = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "redis": subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2],
           "cores": os.cpu_count(), "load_before": open("/proc/loadavg").read().split()[:3]}
    t0 = time.monotonic()
    holds, counts = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            log("holds: %s" % "{:,}".format(n))
            holds.append(run_holds(tmp, n, a))
        srv = Server(tmp)
        try:
            srv.measure_idle()
            for n in sizes:
                for i in insts:
                    log("counts prototype: %s sessions, %d instances" % ("{:,}".format(n), i))
                    counts.append(run_counts(srv, n, i, a))
        finally:
            srv.stop()
    env["load_after"] = open("/proc/loadavg").read().split()[:3]
    env["seconds"] = round(time.monotonic() - t0, 1)
    m = model(holds, counts, a)
    report(holds, counts, m, a, env)
    print("\nrun took %.0f s; load after: %s" % (env["seconds"], env["load_after"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"env": env, "args": vars(a), "holds": holds, "counts": counts, "model": m}, f, indent=1)


if __name__ == "__main__":
    main()
