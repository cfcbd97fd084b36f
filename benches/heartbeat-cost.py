#!/usr/bin/env python3
"""Redis's CPU for automatic rebalancing's heartbeats (docs/operations.md#automatic-rebalancing), from INFO commandstats.

Starts a private redis-server on a free loopback port (stopped by PID on exit), loads the
HEARTBEAT script exactly as src/fleet/heartbeat.rs has it, fills a namespace with the beats of
INSTANCES live instances, then times BEATS beats of one of them: each writes its own beat and
reads every live one back, so one beat costs O(instances) and a fleet's beats O(instances²) per
renewal interval (`fleet_lease_ttl / 3`).

    python3 benches/heartbeat-cost.py [--instances 10,100,1000] [--beats 2000] [--lease 30]
"""
import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fleet_common import ROOT, private_redis  # noqa: E402

SRC = open(os.path.join(ROOT, "src/fleet/heartbeat.rs")).read()
HEARTBEAT = re.search(r'const HEARTBEAT: &str = r"(.*?)";', SRC, re.S).group(1)
KEYS = ("{bench}:instances", "{bench}:instances:expiry")


def evalsha_usec(c):
    info = c.call("INFO", "commandstats").decode()
    m = re.search(r"cmdstat_evalsha:calls=(\d+),usec=(\d+)", info)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def measure(c, sha, instances, beats, lease_ms):
    c.call("DEL", *KEYS)
    c.pipeline([("EVALSHA", sha, 2, *KEYS, f"pod-{i}", f"{1000 + i} r", lease_ms)
                for i in range(instances)])
    c.call("CONFIG", "RESETSTAT")
    for base in range(0, beats, 100):
        c.pipeline([("EVALSHA", sha, 2, *KEYS, f"pod-{(base + k) % instances}", "1000 r", lease_ms)
                    for k in range(min(100, beats - base))])
    calls, usec = evalsha_usec(c)
    return usec / calls


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--instances", default="10,100,1000")
    ap.add_argument("--beats", type=int, default=2000)
    ap.add_argument("--lease", type=float, default=30.0, help="fleet_lease_ttl in s")
    a = ap.parse_args()
    with private_redis() as c:
        sha = c.call("SCRIPT", "LOAD", HEARTBEAT).decode()
        interval = a.lease / 3
        print(f"| instances | µs of Redis CPU per beat | fleet's beats per {interval:g} s interval "
              f"| share of one core |")
        print("| --- | --- | --- | --- |")
        for n in (int(x) for x in a.instances.split(",")):
            per = measure(c, sha, n, a.beats, int(a.lease * 1000))
            per_interval = per * n
            print(f"| {n:,} | {per:.1f} | {per_interval / 1000:.1f} ms | "
                  f"{per_interval / (interval * 1e6) * 100:.3f} % |")


if __name__ == "__main__":
    main()
