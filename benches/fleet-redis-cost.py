#!/usr/bin/env python3
"""Redis's own CPU time for the fleet limits' scripts (docs/operations.md#fleet-wide-limits), from INFO commandstats.

Starts a private redis-server on a free loopback port, loads the two scripts exactly as
src/fleet/scripts.rs has them, and reports, for a fleet-wide set that already holds OTHER
holds of other instances: the Redis CPU per admission, per renewal call of CHUNK holds (the
worker's chunk) and of a whole instance's HOLDS in one call, and per released hold.

    python3 benches/fleet-redis-cost.py [HOLDS=10000] [OTHER=190000] [CHUNK=1000]
"""
import os
import re
import sys

from fleet_common import ROOT, private_redis

SRC = open(os.path.join(ROOT, "src/fleet/scripts.rs")).read()
ADMIT = re.search(r'const ADMIT: &str = r"(.*?)";', SRC, re.S).group(1)
RENEW = re.search(r'const RENEW: &str = r"(.*?)";', SRC, re.S).group(1)
HOLDS, OTHER, CHUNK = (int(a) for a in (sys.argv[1:] + ["10000", "190000", "1000"][len(sys.argv) - 1:])[:3])


def main():
    with private_redis() as c:
        run(c)


def command_stats(c, cmd):
    """Calls and microseconds of `cmd` since the last CONFIG RESETSTAT."""
    info = c.call("INFO", "commandstats").decode()
    m = re.search(r"cmdstat_%s:calls=(\d+),usec=(\d+)" % cmd, info)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def run(c):
    admit = c.call("SCRIPT", "LOAD", ADMIT).decode()
    renew = c.call("SCRIPT", "LOAD", RENEW).decode()
    key, lease = "{bench}:all", 30000
    for base in range(0, OTHER, 1000):
        c.pipeline([("EVALSHA", admit, 1, key, lease, f"other:{i}", 0, 10**9)
                    for i in range(base, min(OTHER, base + 1000))])
    c.call("CONFIG", "RESETSTAT")
    for base in range(0, HOLDS, 1000):
        c.pipeline([("EVALSHA", admit, 1, key, lease, f"me:{i}", 0, 10**9)
                    for i in range(base, min(HOLDS, base + 1000))])
    calls, usec = command_stats(c, "evalsha")
    print(f"admission, set of {OTHER + HOLDS} holds: {usec / calls:.1f} us of Redis CPU per call")
    members = [f"me:{i}" for i in range(HOLDS)]
    for size in (CHUNK, HOLDS):
        c.call("CONFIG", "RESETSTAT")
        for _ in range(5):
            for base in range(0, HOLDS, size):
                part = members[base:base + size]
                c.call("EVALSHA", renew, 1, key, lease, 1, len(part), *part)
        calls, usec = command_stats(c, "evalsha")
        print(f"renewal of {HOLDS} holds in calls of {size}: {usec / calls / 1000:.2f} ms of Redis CPU"
              f" per call, {usec / 5 / 1000:.1f} ms per renewal")
    c.call("CONFIG", "RESETSTAT")
    c.pipeline([("ZREM", key, *members[i:i + 100]) for i in range(0, HOLDS, 100)])
    calls, usec = command_stats(c, "zrem")
    print(f"release in batches of 100: {usec / HOLDS:.2f} us of Redis CPU per hold")


if __name__ == "__main__":
    main()
