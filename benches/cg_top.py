#!/usr/bin/env python3
"""Top functions by self cost (Ir) of one callgrind dump: cg_top.py FILE [N].

Debian's callgrind_annotate 3.19 prints inclusive figures for mid-run dumps; this reads the
callgrind format itself: cost lines add to the current fn=, the cost line after calls= is an
inclusive call cost and is skipped.
"""
import re
import sys
from collections import defaultdict


def main():
    path = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    names = {}
    self_cost = defaultdict(int)
    cur = None
    skip_next = False
    total = 0
    comp = re.compile(r"^\((\d+)\)(?: (.*))?$")
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        if not line:
            continue
        if line.startswith("fn="):
            m = comp.match(line[3:])
            if m:
                if m.group(2):
                    names[m.group(1)] = m.group(2)
                cur = names.get(m.group(1), m.group(1))
            else:
                cur = line[3:]
            continue
        if line.startswith(("cfn=", "cfi=", "cfl=", "cob=")):
            m = comp.match(line.split("=", 1)[1])
            if m and m.group(2) and line.startswith("cfn="):
                names[m.group(1)] = m.group(2)
            continue
        if line.startswith("calls="):
            skip_next = True
            continue
        if line.startswith("summary:") or line.startswith("totals:"):
            total = total or int(line.split()[1])
            continue
        c = line[0]
        if c.isdigit() or c in "+-*":
            if skip_next:
                skip_next = False
                continue
            parts = line.split()
            if len(parts) >= 2 and cur is not None:
                try:
                    self_cost[cur] += int(parts[1])
                except ValueError:
                    pass
    total = total or sum(self_cost.values()) or 1
    print(f"{total:,} Ir in total ({path})")
    print(f"{'Ir (self)':>14}  {'%':>6}  function")
    for fn, v in sorted(self_cost.items(), key=lambda kv: -kv[1])[:n]:
        print(f"{v:>14,}  {100 * v / total:6.2f}  {fn[:150]}")


if __name__ == "__main__":
    main()
