#!/usr/bin/env python3
"""Aggregate benches/run.sh results (one JSON line per measurement) into BENCHMARKS.md + an SVG.

Python 3 standard library only. Usage:
    aggregate.py --results DIR [--markdown BENCHMARKS.md] [--svg benches/benchmarks.svg] [--check]
DIR holds results.jsonl and env.txt as written by run.sh. Each line carries its set-up
("setup": ours / efficient, issue 15; lines without one are "ours"); the report has a section per
set-up. --check exits 1 unless every (set-up, mode, target) measurement that was attempted
reported ok=true and every set-up produced every mode for all its targets (run.sh --smoke).
"""
from __future__ import annotations

import argparse
import html
import json
import re
import os
import statistics
import sys
from collections import defaultdict

PEERS = ("nginx", "haproxy")
SETUP_ORDER = ("ours", "efficient")
# what each set-up of run.sh is (issue 15); a set-up not listed here is described by env.txt alone
SETUP_DESC = {
    "ours": {
        "echo upstream": "`wsgate-bench echo --kind frame`: hand-rolled frame-level echo (no message "
                         "reassembly, 64 KiB+ reads, one write per read batch), tokio multi-thread, 2 workers",
        "nginx": "`worker_processes 2`, `proxy_buffer_size 4k` (the default page)",
        "haproxy": "`nbthread 2`",
        "load generator": "tokio multi-thread runtime, 2 workers (`--threads 2`)",
    },
    "efficient": {
        "echo upstream": "`wsgate-bench echo --kind tungstenite`: tokio-tungstenite on a current-thread "
                         "runtime; reads whole messages and sends each back as the library frames it "
                         "(header + payload into its write buffer, flush after each message)",
        "nginx": "`worker_processes 1`, `proxy_buffer_size 16k` (and `proxy_busy_buffers_size 16k`, which "
                 "nginx requires beside it; a tunnel does not use it)",
        "haproxy": "`nbthread 1`",
        "load generator": "current-thread runtime (`--threads 0`): one thread",
    },
}
ORDER = ("direct", "wsgate", "nginx", "haproxy")
COLORS = {"direct": "#9e9e9e", "wsgate": "#1f77b4", "nginx": "#2ca02c", "haproxy": "#d62728"}
EXTRA_COLORS = ["#17becf", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]


def target_order(names):
    """direct, wsgate, wsgate variants (wsgate-*), nginx, haproxy, anything else."""
    def key(t):
        if t in ORDER:
            return (ORDER.index(t) if t != "nginx" and t != "haproxy" else ORDER.index(t) + 10, t)
        if t.startswith("wsgate-"):
            return (5, t)
        return (50, t)
    return sorted(names, key=key)


def color(t, names):
    if t in COLORS:
        return COLORS[t]
    extras = [n for n in target_order(names) if n not in COLORS]
    return EXTRA_COLORS[extras.index(t) % len(EXTRA_COLORS)] if t in extras else "#555555"


def setup_of(r: dict) -> str:
    return r.get("setup") or "ours"


def setups_in(rows, env):
    """Set-ups in run order: env's list first, then any other found in the rows."""
    names = env.get("setups", "").split()
    for r in rows:
        if setup_of(r) not in names:
            names.append(setup_of(r))
    return sorted(names, key=lambda s: (SETUP_ORDER.index(s) if s in SETUP_ORDER else 99, names.index(s)))


def variant(r: dict) -> str:
    m = r.get("mode", "?")
    if m == "latency":
        return f"latency c={r.get('conns', '?')}"
    if m == "idle":
        return f"idle n={r.get('count', '?')}"
    return m


# (variant prefix, field, label, unit, higher_is_better, scale)
METRICS = {
    "latency": [
        ("msgs_per_s", "msgs/s", "", True, 1),
        ("p50_us", "RTT p50", "µs", False, 1),
        ("p99_us", "RTT p99", "µs", False, 1),
        ("cpu_us_per_msg", "proxy CPU/msg", "µs", False, 1),
        ("echo_cpu_us_per_msg", "echo CPU/msg", "µs", None, 1),
        ("machine_cpu_us_per_msg", "machine CPU/msg", "µs", False, 1),
    ],
    "throughput": [
        ("mb_per_s", "MB/s echoed", "MB/s", True, 1),
        ("cpu_s_per_gb", "proxy CPU/GB proxied", "s", False, 1),
        ("echo_cpu_s_per_gb", "echo CPU/GB", "s", None, 1),
        ("machine_cpu_s_per_gb", "machine CPU/GB", "s", False, 1),
    ],
    "handshake": [
        ("upgrades_per_s", "upgrades/s", "", True, 1),
        ("upgrade_p99_us", "upgrade p99", "µs", False, 1),
        ("failures", "failures", "", False, 1),
        ("cpu_us_per_upgrade", "proxy CPU/upgrade", "µs", False, 1),
        ("echo_cpu_us_per_upgrade", "echo CPU/upgrade", "µs", None, 1),
        ("machine_cpu_us_per_upgrade", "machine CPU/upgrade", "µs", False, 1),
    ],
    "idle": [
        ("held", "held", "", True, 1),
        ("rss_bytes_per_conn", "RSS/conn", "KiB", False, 1 / 1024),
        ("fds_per_conn", "fds/conn", "", False, 1),
        ("cpu_us_per_conn", "proxy CPU/conn set-up", "µs", False, 1),
    ],
    "cap": [
        ("admitted", "admitted", "", None, 1),
        ("rejected_503", "503", "", None, 1),
        ("hung", "hung", "", False, 1),
        ("t503_p50_us", "time-to-503 p50", "µs", False, 1),
        ("t503_p99_us", "time-to-503 p99", "µs", False, 1),
        ("cpu_us_per_attempt", "proxy CPU/attempt", "µs", False, 1),
    ],
    "storm": [
        ("admitted", "admitted", "", None, 1),
        ("time_to_cap_s", "time to cap", "s", False, 1),
        ("refused_503", "503", "", None, 1),
        ("refused_1013", "Close 1013", "", None, 1),
        ("attempts", "attempts", "", None, 1),
        ("errors", "errors", "", False, 1),
        ("proxy_cpu_s", "proxy CPU", "s", False, 1),
        ("proxy_cpu_us_per_admission", "proxy CPU/admission", "µs", False, 1),
        ("peak_rss_kib", "peak RSS", "MiB", False, 1 / 1024),
    ],
}


def load(dirname: str):
    rows = []
    with open(os.path.join(dirname, "results.jsonl")) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    rows.append({"mode": "?", "target": "?", "ok": False, "error": line[:200]})
    env = {}
    p = os.path.join(dirname, "env.txt")
    if os.path.exists(p):
        for line in open(p):
            if "=" in line:
                k, v = line.rstrip("\n").split("=", 1)
                env[k] = v
    return rows, env


def fmt(x, unit_scale=1.0):
    if x is None:
        return "–"
    x = x * unit_scale
    a = abs(x)
    if float(x).is_integer() and unit_scale == 1:
        return f"{int(x):,}"
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


class Stats:
    def __init__(self, rows):
        # values[variant][target][field] = [per-round values]
        self.values = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
        self.fail = defaultdict(lambda: defaultdict(int))
        self.runs = defaultdict(lambda: defaultdict(int))
        for r in rows:
            v, t = variant(r), r.get("target", "?")
            self.runs[v][t] += 1
            if not r.get("ok"):
                self.fail[v][t] += 1
            for k, x in r.items():
                if isinstance(x, (int, float)) and not isinstance(x, bool):
                    self.values[v][t][k].append(float(x))

    def med(self, v, t, f):
        xs = self.values.get(v, {}).get(t, {}).get(f)
        return statistics.median(xs) if xs else None

    def rng(self, v, t, f):
        xs = self.values.get(v, {}).get(t, {}).get(f)
        return (min(xs), max(xs)) if xs else None

    def best_peer(self, v, f, higher):
        cands = [(p, self.med(v, p, f)) for p in PEERS]
        cands = [(p, x) for p, x in cands if x is not None]
        if not cands:
            return None, None
        return (max if higher else min)(cands, key=lambda c: c[1])


def variants_sorted(stats):
    def key(v):
        mode = v.split(" ")[0]
        order = ["latency", "throughput", "handshake", "idle", "cap", "storm"]
        n = 0
        if "=" in v:
            try:
                n = int(v.split("=")[1])
            except ValueError:
                n = 0
        return (order.index(mode) if mode in order else 99, n)

    return sorted(stats.values.keys() | stats.runs.keys(), key=key)


def cell(stats, v, t, f, scale):
    m = stats.med(v, t, f)
    if m is None:
        return "–"
    lo, hi = stats.rng(v, t, f)
    if len(stats.values[v][t][f]) > 1 and lo != hi:
        return f"{fmt(m, scale)} ({fmt(lo, scale)}..{fmt(hi, scale)})"
    return fmt(m, scale)


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def targets_table(stats, env):
    """The issue's targets: list of (target text, measured text, verdict)."""
    out = []
    has_ws = any("wsgate" in stats.values[v] for v in stats.values)

    def row(text, v, f, higher, factor, against="peer"):
        w = stats.med(v, "wsgate", f)
        if against == "peer":
            bp, b = stats.best_peer(v, f, higher)
            who = bp
        else:
            bp, b = against, stats.med(v, against, f)
            who = against
        r = ratio(w, b)
        if w is not None and b is not None and r is None:
            out.append((text, f"wsgate {fmt(w)} vs {who} {fmt(b)}", "n/a (zero reference)"))
            return
        if w is None or b is None:
            out.append((text, "n/a (wsgate not measured)" if not has_ws else "n/a", "not measured"))
            return
        ok = (r >= factor) if higher else (r <= factor)
        out.append((text, f"wsgate {fmt(w)} vs {who} {fmt(b)}: **{r:.2f}×**", "met" if ok else "**missed**"))

    row("Small messages, C=64: msgs/s ≥ 1.15× better peer", "latency c=64", "msgs_per_s", True, 1.15)
    row("Small messages, C=64: p99 ≤ 0.85× better peer", "latency c=64", "p99_us", False, 0.85)
    row("Bulk throughput ≥ 1.3× better peer", "throughput", "mb_per_s", True, 1.3)
    row("Upgrades/s ≥ 1.1× better peer", "handshake", "upgrades_per_s", True, 1.1)
    row("Over-cap 503 p50 at least as fast as NGINX", "cap", "t503_p50_us", False, 1.0, against="nginx")
    row("Over-cap 503 p99 at least as fast as NGINX", "cap", "t503_p99_us", False, 1.0, against="nginx")
    row("CPU per message (C=64) ≤ 0.8× better peer", "latency c=64", "cpu_us_per_msg", False, 0.8)
    row("CPU per GB ≤ 0.8× better peer", "throughput", "cpu_s_per_gb", False, 0.8)
    row("CPU per upgrade ≤ 0.8× better peer", "handshake", "cpu_us_per_upgrade", False, 0.8)
    idle_vs = [v for v in stats.values if v.startswith("idle")]
    for v in sorted(idle_vs, key=lambda s: int(s.split("=")[1]) if s.split("=")[1].isdigit() else 0):
        w = stats.med(v, "wsgate", "rss_bytes_per_conn")
        if w is None:
            out.append((f"Idle memory ≤ 4 KiB/conn ({v})", "n/a", "not measured"))
        else:
            out.append((f"Idle memory ≤ 4 KiB/conn ({v})", f"{fmt(w / 1024)} KiB/conn",
                        "met" if w <= 4096 else "**missed**"))
    if idle_vs:
        vmax = max(idle_vs, key=lambda s: int(s.split("=")[1]) if s.split("=")[1].isdigit() else 0)
        n = int(vmax.split("=")[1])
        held = stats.med(vmax, "wsgate", "held")
        if held is None:
            out.append((f"Scale: hold {n:,} idle proxied connections", "n/a", "not measured"))
        else:
            out.append((f"Scale: hold {n:,} idle proxied connections (descriptor limit {env.get('nofile_hard', '?')})",
                        f"held {fmt(held)}", "met" if held >= n else "**missed**"))
    cap = env.get("cap", "?")
    adm = stats.rng("cap", "wsgate", "admitted")
    hung = stats.med("cap", "wsgate", "hung")
    if adm is None:
        out.append((f"Cap {cap}: admitted ≤ cap, none hung", "n/a", "not measured"))
    else:
        ok = cap.isdigit() and adm[1] <= int(cap) and (hung or 0) == 0
        out.append((f"Cap {cap}: admitted ≤ cap, none hung", f"admitted {fmt(adm[0])}..{fmt(adm[1])}, hung {fmt(hung)}",
                    "met" if ok else "**missed**"))
    return out


def scale_lines(stats):
    """Per-connection slope between the smallest and largest idle counts: cost of 100k."""
    lines = []
    idle_vs = [v for v in stats.values if v.startswith("idle")]
    pts = []
    for v in idle_vs:
        try:
            pts.append((int(v.split("=")[1]), v))
        except ValueError:
            pass
    if len(pts) < 2:
        return lines
    pts.sort()
    (n0, v0), (n1, v1) = pts[0], pts[-1]
    for t in ("wsgate",) + PEERS:
        a, b = stats.med(v0, t, "rss_kib"), stats.med(v1, t, "rss_kib")
        base = stats.med(v1, t, "rss_base_kib")
        if a is None or b is None or n1 == n0:
            continue
        slope = (b - a) * 1024 / (n1 - n0)
        est = (base or 0) * 1024 + slope * 100_000
        lines.append(f"| {t} | {fmt(slope / 1024)} KiB | {fmt(est / 2**20)} MiB |")
    return lines


def idle_points(stats):
    """[(n, variant)] of the idle counts measured, ascending."""
    pts = []
    for v in stats.values:
        if v.startswith("idle n="):
            try:
                pts.append((int(v.split("=")[1]), v))
            except ValueError:
                pass
    return sorted(pts)


def issue15_table(stats, env):
    """Issue 15's targets for one set-up: rows of (target, who, measured, ratio, verdict); one row
    for wsgate and one per wsgate variant present. Ratios are wsgate ÷ the better peer (÷ NGINX for
    the 503 rows); CPU rows also show the whole machine's ratio (generator + echo + proxy)."""
    wsg = [t for t in target_order({t for v in stats.runs for t in stats.runs[v]}) if t.startswith("wsgate")]
    if not wsg:
        wsg = ["wsgate"]
    out = []

    def rows_for(text, v, f, higher, factor, unit, against="peer", machine=None, strict=False):
        for i, t in enumerate(wsg):
            label = text if i == 0 else f"″ {t}"
            w = stats.med(v, t, f)
            if against == "peer":
                who, b = stats.best_peer(v, f, higher)
            else:
                who, b = against, stats.med(v, against, f)
            r = ratio(w, b)
            if w is None or b is None:
                out.append((label, t, "–", "–", "not measured"))
                continue
            meas = f"{fmt(w)} vs {who} {fmt(b)}{unit}"
            if machine:
                mw = stats.med(v, t, machine)
                mwho, mb = stats.best_peer(v, machine, False)
                mr = ratio(mw, mb)
                if mr is not None:
                    meas += f"; whole machine {fmt(mw)} vs {mwho} {fmt(mb)}{unit}: {mr:.2f}×"
            if r is None:
                out.append((label, t, meas, "–", "n/a (zero reference)"))
                continue
            if strict:
                ok = (r > factor) if higher else (r < factor)
            else:
                ok = (r >= factor) if higher else (r <= factor)
            out.append((label, t, meas, f"**{r:.2f}×**", "met" if ok else "**missed**"))

    rows_for("CPU per message, C=64 ≤ 0.9× better peer", "latency c=64", "cpu_us_per_msg", False, 0.9, " µs",
             machine="machine_cpu_us_per_msg")
    rows_for("msgs/s, C=64 ≥ 1.05× better peer", "latency c=64", "msgs_per_s", True, 1.05, "")
    rows_for("RTT p99, C=64 ≤ 1.0× better peer", "latency c=64", "p99_us", False, 1.0, " µs")
    rows_for("CPU per GB ≤ 0.8× better peer", "throughput", "cpu_s_per_gb", False, 0.8, " s",
             machine="machine_cpu_s_per_gb")
    rows_for("MB/s ≥ 1.1× better peer", "throughput", "mb_per_s", True, 1.1, "")
    rows_for("CPU per upgrade ≤ 0.9× better peer", "handshake", "cpu_us_per_upgrade", False, 0.9, " µs",
             machine="machine_cpu_us_per_upgrade")
    rows_for("upgrades/s ≥ 1.05× better peer", "handshake", "upgrades_per_s", True, 1.05, "")
    rows_for("503 p50 ≤ 1.0× NGINX", "cap", "t503_p50_us", False, 1.0, " µs", against="nginx")
    rows_for("503 p99 ≤ 1.0× NGINX", "cap", "t503_p99_us", False, 1.0, " µs", against="nginx")
    # reconnect storm (ratio < 1.0: wsgate strictly ahead of the better peer, so of both)
    rows_for("Storm: time to re-admit the cap ahead of both peers (< 1.0× better peer)", "storm", "time_to_cap_s",
             False, 1.0, " s", strict=True)
    rows_for("Storm: proxy CPU ahead of both peers (< 1.0× better peer)", "storm", "proxy_cpu_s", False, 1.0, " s",
             strict=True)
    pts = idle_points(stats)
    conc = env.get("idle_conc", "128")
    for want_n, limit in ((1000, 4), (9000, 3)):
        # the largest count stands in for 9000 when the descriptor limit allowed fewer
        cands = [p for p in pts if p[0] == want_n] or ([pts[-1]] if want_n == 9000 and pts and pts[-1][0] > 1000 else [])
        text = f"idle RSS/conn ≤ {limit} KiB at n={want_n:,} ({conc} handshakes in flight)"
        if not cands:
            out.append((text, "wsgate", "–", "–", "not measured"))
            continue
        n, v = cands[0]
        if n != want_n:
            text += f" — measured at n={n:,} (descriptor limit)"
        for i, t in enumerate(wsg):
            w = stats.med(v, t, "rss_bytes_per_conn")
            label = text if i == 0 else f"″ {t}"
            if w is None:
                out.append((label, t, "–", "–", "not measured"))
                continue
            bp, b = stats.best_peer(v, "rss_bytes_per_conn", False)
            peer = f" (better peer: {bp} {fmt(b / 1024)} KiB)" if b is not None else ""
            r = ratio(w, b)
            out.append((label, t, f"{fmt(w / 1024)} KiB{peer}", f"{r:.2f}× ({bp})" if r is not None else "–",
                        "met" if w <= limit * 1024 else "**missed**"))
    return out


def results_tables(A, stats):
    """The per-mode tables of one set-up (median (min..max), ratio rows)."""
    for v in variants_sorted(stats):
        mode = v.split(" ")[0]
        mets = METRICS.get(mode)
        if not mets:
            continue
        present = target_order(stats.runs[v].keys())
        if mode == "storm":
            n = next((stats.med(v, t, "clients") for t in present if stats.med(v, t, "clients") is not None), None)
            k = next((stats.med(v, t, "cap") for t in present if stats.med(v, t, "cap") is not None), None)
            A(f"#### Reconnect storm ({fmt(n)} clients, cap {fmt(k)})")
        else:
            A(f"#### {v}")
        A("")
        hdr = ["target"] + [f"{lab}" + (f" ({unit})" if unit else "") for _, lab, unit, _, _ in mets] + ["runs ok"]
        A("| " + " | ".join(hdr) + " |")
        A("|" + " --- |" * len(hdr))
        for t in present:
            cells = [f"**{t}**" if t.startswith("wsgate") else t] + [cell(stats, v, t, f, sc) for f, _, _, _, sc in mets]
            cells.append(f"{stats.runs[v][t] - stats.fail[v][t]}/{stats.runs[v][t]}")
            A("| " + " | ".join(cells) + " |")
        if "direct" in present:
            for t in present:
                if t == "direct":
                    continue
                rc = [f"*{t} ÷ direct*"]
                for f, _, _, higher, _ in mets:
                    r = ratio(stats.med(v, t, f), stats.med(v, "direct", f))
                    rc.append(f"{r:.2f}×" if r is not None else "–")
                rc.append("")
                A("| " + " | ".join(rc) + " |")
        for t in [t for t in present if t.startswith("wsgate")]:
            rp = [f"**{t} ÷ better peer**"]
            for f, _, _, higher, _ in mets:
                if higher is None:
                    rp.append("–")
                    continue
                bp, b = stats.best_peer(v, f, higher)
                r = ratio(stats.med(v, t, f), b)
                rp.append(f"{r:.2f}× ({bp})" if r is not None else "–")
            rp.append("")
            A("| " + " | ".join(rp) + " |")
        A("")


def callgrind_table(A, stats):
    cg = [t for t in target_order(stats.runs.get("callgrind", {}).keys())]
    if not cg:
        return
    A("#### Instructions per unit of work (callgrind)")
    A("")
    A("Each proxy run once more under `valgrind --tool=callgrind` (`benches/run.sh --callgrind`): "
      "counters zeroed before and dumped after fixed-size phases (300 upgrades 4 at a time; 3,000 "
      "32-byte round trips on one connection; 200 × 64 KiB messages, 4 in flight). Deterministic, "
      "unlike the timings, but **user space only**: the system calls, which dominate a proxy's CPU "
      "time on this VM, are not in these counts. Top functions per phase: `benches/profile/`.")
    A("")
    A("| target | instructions / upgrade | instructions / message | instructions / KiB proxied |")
    A("| --- | --- | --- | --- |")
    for t in cg:
        A(f"| {t} | {fmt(stats.med('callgrind', t, 'ir_per_upgrade'))} | "
          f"{fmt(stats.med('callgrind', t, 'ir_per_msg'))} | {fmt(stats.med('callgrind', t, 'ir_per_kib'))} |")
    for t in [t for t in cg if t.startswith("wsgate")]:
        cells = [f"**{t} ÷ better peer**"]
        for f in ("ir_per_upgrade", "ir_per_msg", "ir_per_kib"):
            bp, b = stats.best_peer("callgrind", f, False)
            r = ratio(stats.med("callgrind", t, f), b)
            cells.append(f"{r:.2f}× ({bp})" if r is not None else "–")
        A("| " + " | ".join(cells) + " |")
    A("")


HAND_BEGIN = "<!-- hand-written: begin (benches/aggregate.py keeps this section when it regenerates the file) -->"
HAND_END = "<!-- hand-written: end -->"


def hand_written(path):
    """The sections of an existing report between HAND_BEGIN and HAND_END lines, markers included:
    figures from scripts other than run.sh (e.g. fleet-cost-model.py) that a regeneration keeps."""
    try:
        text = open(path).read()
    except FileNotFoundError:
        return []
    return re.findall(r"^%s\n.*?^%s$" % (re.escape(HAND_BEGIN), re.escape(HAND_END)), text, re.S | re.M)


def write_markdown(path, by_setup, env, rows, svg_rel):
    kept = hand_written(path)
    L = []
    A = L.append
    setups = list(by_setup)
    A("# Benchmarks")
    A("")
    A(f"Generated by `benches/run.sh` on {env.get('date', '?')} (git `{env.get('git', '?')}`), "
      f"rounds: {env.get('rounds', '?')}, set-ups {', '.join(f'`{s}`' for s in setups)}, the rounds interleaving "
      "set-ups and targets. Regenerate with the same command; do not edit by hand, except the sections "
      "marked hand-written, which it keeps.")
    A("")
    A("```sh")
    A("benches/run.sh            # full run of both set-ups: builds, installs nginx+haproxy if missing, writes this file")
    A("benches/run.sh --smoke    # every mode of both set-ups at tiny sizes, non-zero exit on failure")
    A("```")
    A("")
    targets = env.get("targets", "").split()
    if "wsgate" not in targets:
        A("> **wsgate is not in this run** (its binary was not available when the run started); "
          "the table shows the harness against the echo upstream directly and the two peers.")
        A("")
    A("## Environment")
    A("")
    A("| | |")
    A("| --- | --- |")
    for k, label in [("cpu", "CPU"), ("cores", "cores"), ("kernel", "kernel"), ("nofile_hard", "RLIMIT_NOFILE hard"),
                     ("wsgate", "wsgate"), ("nginx", "nginx"), ("haproxy", "HAProxy"), ("rustc", "rustc"),
                     ("targets", "targets"), ("setups", "set-ups"), ("rounds", "rounds")]:
        A(f"| {label} | {env.get(k, '?') or '–'} |")
    A("")
    A("Everything (load generator, echo upstream, proxy) shares the same 2 cores at the same `nice` "
      "level, on loopback. Absolute numbers are therefore low and noisy; the ratios within one run are "
      "the point, and the per-unit **CPU time of the proxy process** (utime+stime from `/proc/PID/stat`, "
      "summed over the process tree for nginx's workers) is the fairest figure. The **machine CPU** "
      "columns add the echo's CPU (`/proc`) and the load generator's own (`getrusage(RUSAGE_SELF)`) to "
      "the proxy's: on loopback the receiving side's TCP work (softirq) runs in whichever process sends, "
      "so work shifts between processes and the sum is the cost of the whole exchange.")
    A("")
    A("## Set-ups (issue 15)")
    A("")
    A("Two set-ups side by side: **ours** (what this harness has always run) and **efficient** (the "
      "peers at their most CPU-efficient configuration on this 2-core machine, and an upstream that "
      "writes the way a WebSocket library writes).")
    A("")
    A("| | " + " | ".join(f"`{s}`" for s in setups) + " |")
    A("|" + " --- |" * (len(setups) + 1))
    for part in ("echo upstream", "nginx", "haproxy", "load generator"):
        A(f"| {part} | " + " | ".join(SETUP_DESC.get(s, {}).get(part, env.get(f"setup_{s}", "?")) for s in setups) + " |")
    A("")
    A("| target | how it runs (both set-ups) |")
    A("| --- | --- |")
    A("| direct | the load generator talks to the echo upstream itself: the ceiling |")
    A("| wsgate | `target/release/wsgate` with `WSGATE_UPSTREAM=<echo>` `WSGATE_LISTEN=127.0.0.1:0` "
      "`WSGATE_ADMIN_LISTEN=127.0.0.1:0` `WSGATE_MAX_CLIENTS=<cap or 0>`, everything else default "
      "(no `TOKIO_WORKER_THREADS`: one worker per core) |")
    A("| nginx | `benches/conf/nginx.conf.tmpl`: workers and `proxy_buffer_size` per set-up, "
      "`worker_connections 20000`, `worker_rlimit_nofile 20000`, `proxy_http_version 1.1` + "
      "Upgrade/Connection headers, `proxy_buffering off`, `tcp_nodelay on`, `access_log off`, "
      "`backlog=4096`; cap mode: `limit_conn_zone $server_addr` + "
      f"`limit_conn wscap {env.get('cap', 'K')}` + `limit_conn_status 503` |")
    A("| haproxy | `benches/conf/haproxy.cfg.tmpl`: one process, `nbthread` per set-up, `maxconn 9900`, "
      "`tune.bufsize 16384` (default; buffers are taken from a pool only while data is in flight), "
      "`timeout tunnel 1h`, no logging; cap mode: `http-request deny deny_status 503 if "
      f"{{ srv_conn(be/echo) ge {env.get('cap', 'K')} }}` plus server `maxconn {env.get('cap', 'K')}` "
      "(`timeout queue 1s` for the few that race past the ACL) |")
    variants = sorted(k[len("variant_"):] for k in env if k.startswith("variant_"))
    for t in variants:
        A(f"| {t} | wsgate variant: {env[f'variant_{t}']} |")
    A("")
    A("A fresh echo and a fresh proxy process are started for every single measurement and stopped by "
      "PID afterwards. The order of the targets rotates each round (A B C D, B C D A, ...), and so does "
      "the order of the set-ups.")
    A("")
    A("| mode | what is measured |")
    A("| --- | --- |")
    A("| latency c=1 / c=64 | C connections, each sends a 32-byte binary message and awaits its echo, "
      "3 s: msgs/s, RTT percentiles (HDR histogram), proxy / echo / whole-machine CPU µs per message. The "
      "upgrade is done by tokio-tungstenite, then the client writes pre-built masked frames and parses the "
      "echoes itself (half the CPU of tungstenite's data path, which leaves more of the 2 cores to the proxy) |")
    A("| throughput | 4 connections × 8 in-flight 64 KiB binary messages, 3 s, same raw client: MB/s of "
      "payload echoed back; CPU s per GB proxied (each echoed byte crosses the proxy twice) |")
    A(f"| handshake | {int(env.get('hs_total') or 3000):,} × (connect, tokio-tungstenite upgrade, close handshake), 64 at a time: "
      "upgrades/s, failures, CPU µs per upgrade |")
    A(f"| idle n=N | fresh proxy; open N upgraded connections, **{env.get('idle_conc', '128')} handshakes in "
      f"flight** at a time, each exchanges one 15-byte message right "
      f"after its upgrade (so buffers kept after the first data are counted too), then all are held "
      f"idle, 1 s settle: (VmRSS after − VmRSS before) / N, fds / N; 8 of them must still echo "
      f"afterwards. N up to {env.get('idle_max', '?')} (a proxied connection costs the proxy 2 "
      f"descriptors of the {env.get('nofile_hard', '?')} allowed) |")
    A(f"| cap | proxy capped at {env.get('cap', 'K')}: 4,000 upgrades launched at once, admitted ones held "
      "until all have an answer: admitted, 503, hung (no answer in 5 s), time from the start of the TCP "
      "connect to the 503 (p50, p99) |")
    sn, sk = env.get("storm_clients", "10000"), env.get("storm_cap", "5000")
    sn = f"{int(sn):,}" if sn.isdigit() else sn
    sk = f"{int(sk):,}" if sk.isdigit() else sk
    A(f"| storm (reconnect storm) | after a deploy, a node drain or a network blip, every client of a pod reconnects "
      f"at once, with no backoff, into a proxy whose cap is half of them. **Before the cut**: {sn} clients hold "
      f"WebSocket connections opened directly to the echo upstream (the pod that goes away), 256 opens in flight, "
      f"each verified by one echoed message. **The cut** (t0): all {sn} are dropped at once (`SO_LINGER` 0) and every "
      f"one reconnects through the proxy, capped at {sk} as in cap mode; a refused client (503 or another status, or "
      "a 101 followed by a Close: wsgate's close mode sends Close 1013) retries at once on a new connection. An "
      "attempt is **admitted** only when one WebSocket message has round-tripped through it (a 101 then Close 1013 "
      "is a refusal, counted apart); admitted clients hold their connection and stop. **Done** when "
      f"{sk} are admitted (every other client stops retrying; attempts in flight then finish and must not be "
      "admitted), or at 60 s, a failure. Reported: time to cap (t0 → the cap-th admission), "
      "refusals (503, Close 1013), attempts, errors (connect errors, resets, timeouts, by kind), the proxy's CPU "
      "from t0 to done (process tree) and per admission, and its **peak RSS over the storm** (`VmHWM`, reset at t0 "
      "by `echo 5 > /proc/PID/clear_refs`, read at done, summed over the process tree). A run is ok when exactly "
      "the cap is admitted, never more at once (counted by the clients), with no errors. HAProxy's server "
      "`maxconn` queues the attempts that race past its `srv_conn` check (503 after `timeout queue`, 1 s) "
      "rather than refusing them, which is allowed. A refused client reads a `Connection: close` answer "
      "(wsgate's) to EOF before it closes, so TIME_WAIT stays on the proxy's side and client ports do not pile "
      "up; NGINX and HAProxy answer their 503 keep-alive, so those refusals are closed with `SO_LINGER` 0 |")
    A("")
    A("Reading the numbers: generator, echo and proxy share 2 cores, so msgs/s and MB/s through a proxy "
      "are bounded by the *sum* of the three processes' CPU per message; a proxy that costs 20 % less CPU "
      "per message shows up as a smaller gain in msgs/s. The proxy CPU columns isolate the proxy. "
      "Times to 503 include the kernel's accept queue: a listener whose backlog is smaller than the "
      "burst drops SYNs and the client retries after 1 s (nginx is given `backlog=4096`; HAProxy's "
      "backlog follows its maxconn, capped by `net.core.somaxconn`). With HAProxy, the attempts that race "
      "past the `srv_conn` check wait in the server queue and get their 503 after `timeout queue` (1 s), "
      "which is what its p99 shows. In a storm the generator's clients (all of them retrying at once) take "
      "their share of the same 2 cores, so its time to cap is the whole machine's; the proxy's CPU over the "
      "storm is its own.")
    A("")
    for setup, stats in by_setup.items():
        A(f"## Results: set-up `{setup}`")
        A("")
        A(f"Set-up: {env.get(f'setup_{setup}', '?')}. Median across rounds, (min..max) when they differ. Ratios: wsgate ÷ "
          "direct and wsgate ÷ the better of nginx/haproxy for that row (for lower-is-better metrics a "
          "ratio below 1 is a win).")
        A("")
        results_tables(A, stats)
        sl = scale_lines(stats)
        if sl:
            A("#### Idle memory slope and the cost of 100,000 connections")
            A("")
            A("Slope of the proxy's RSS between the smallest and the largest idle count, and what 100,000 idle "
              "connections would take by that slope (plus the base RSS). Descriptors are the other limit: "
              "100,000 proxied connections need RLIMIT_NOFILE ≥ 200,000 in the proxy.")
            A("")
            A("| target | RSS per connection (slope) | estimated RSS at 100,000 |")
            A("| --- | --- | --- |")
            L.extend(sl)
            A("")
        callgrind_table(A, stats)
        A(f"### Issue 15 targets, set-up `{setup}`")
        A("")
        A("Ratio = wsgate ÷ the better of nginx/haproxy (÷ nginx for the 503 rows), medians; a variant's "
          "rows follow wsgate's (″). CPU rows give the whole machine's ratio too (generator + echo + proxy); "
          "the verdict is on the proxy's own CPU.")
        A("")
        A("| target | wsgate | measured (medians) | ratio | verdict |")
        A("| --- | --- | --- | --- | --- |")
        for text, who, meas, r, verdict in issue15_table(stats, env):
            A(f"| {text} | {who} | {meas} | {r} | {verdict} |")
        A("")
    first = "ours" if "ours" in by_setup else (setups[0] if setups else None)
    if first is not None:
        A(f"## Targets of issue 4 (set-up `{first}`)")
        A("")
        A("| target | measured (medians) | verdict |")
        A("| --- | --- | --- |")
        for text, meas, verdict in targets_table(by_setup[first], env):
            A(f"| {text} | {meas} | {verdict} |")
        A("")
    if svg_rel:
        A("## Plot")
        A("")
        A(f"![medians per set-up and target, whiskers min..max]({svg_rel})")
        A("")
    failed = [r for r in rows if not r.get("ok")]
    if failed:
        A("## Failed measurements")
        A("")
        A("A failed measurement still contributes the figures it printed; these are the ones that did not pass "
          "their own checks (errors, failures, hung attempts, admitted above the cap):")
        A("")
        for r in failed[:40]:
            keep = {k: r[k] for k in ("setup", "mode", "target", "round", "conns", "count", "errors", "failures",
                                      "failure_kinds", "hung", "admitted", "max_concurrent_admitted",
                                      "precut_failures", "stuck", "first_error", "error") if k in r}
            A(f"- `{json.dumps(keep, ensure_ascii=False)}`")
        A("")
    for block in kept:
        A(block)
        A("")
    A("## Raw data")
    A("")
    A("One JSON line per measurement (`setup` names the set-up): [`benches/last-run.jsonl`](benches/last-run.jsonl); "
      "environment: [`benches/last-run.env`](benches/last-run.env). The tool: `benches/wsgate-bench` "
      "(`wsgate-bench --help`). Not part of CI's pass/fail (it is noisy); `benches/run.sh --smoke` can be.")
    A("")
    with open(path, "w") as f:
        f.write("\n".join(L))


PLOT = [
    ("latency c=1", "msgs_per_s", "latency c=1: msgs/s", True, 1),
    ("latency c=64", "msgs_per_s", "latency c=64: msgs/s", True, 1),
    ("latency c=64", "p99_us", "latency c=64: RTT p99 (µs)", False, 1),
    ("latency c=64", "cpu_us_per_msg", "proxy CPU per msg (µs)", False, 1),
    ("throughput", "mb_per_s", "throughput (MB/s)", True, 1),
    ("throughput", "cpu_s_per_gb", "proxy CPU per GB (s)", False, 1),
    ("handshake", "upgrades_per_s", "upgrades/s", True, 1),
    ("handshake", "cpu_us_per_upgrade", "proxy CPU per upgrade (µs)", False, 1),
    ("cap", "t503_p99_us", "time-to-503 p99 (µs)", False, 1),
    ("storm", "time_to_cap_s", "storm: time to re-admit the cap (s)", False, 1),
    ("storm", "proxy_cpu_s", "storm: proxy CPU (s)", False, 1),
]


def write_svg(path, by_setup):
    """One block of panels per set-up (titles prefixed with the set-up's name)."""
    panels = []
    for setup, stats in by_setup.items():
        pre = f"{setup}: " if len(by_setup) > 1 else ""
        for v, f, title, higher, sc in PLOT:
            panels.append((stats, v, f, pre + title, higher, sc))
        for _, v in idle_points(stats):
            panels.append((stats, v, "rss_bytes_per_conn", f"{pre}{v}: proxy RSS per conn (KiB)", False, 1 / 1024))
    all_targets = target_order({t for st in by_setup.values() for v in st.runs for t in st.runs[v]})
    cols = 3
    pw, ph = 330, 40 + 26 * len(all_targets)
    rows_n = (len(panels) + cols - 1) // cols
    W, H = cols * pw + 20, rows_n * (ph + 20) + 50
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
         f'font-family="sans-serif" font-size="11">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         '<text x="10" y="20" font-size="14" font-weight="bold">wsgate vs nginx vs haproxy '
         '(medians, whiskers = min..max across rounds; ↑ higher is better, ↓ lower is better)</text>']
    for i, (stats, v, f, title, higher, sc) in enumerate(panels):
        x0 = 10 + (i % cols) * pw
        y0 = 35 + (i // cols) * (ph + 20)
        arrow = "↑" if higher else "↓"
        o.append(f'<text x="{x0}" y="{y0 + 14}" font-weight="bold">{html.escape(title)} {arrow}</text>')
        vals = []
        for t in all_targets:
            m = stats.med(v, t, f)
            r = stats.rng(v, t, f)
            if m is not None:
                vals.append((t, m * sc, (r[0] * sc, r[1] * sc)))
        if not vals:
            o.append(f'<text x="{x0}" y="{y0 + 36}" fill="#888">no data</text>')
            continue
        vmax = max(max(x[2][1], x[1]) for x in vals) or 1
        bx, bw = x0 + 60, pw - 130
        for j, (t, m, (lo, hi)) in enumerate(vals):
            y = y0 + 24 + j * 26
            w = max(1.0, bw * m / vmax)
            o.append(f'<text x="{x0}" y="{y + 13}">{t}</text>')
            o.append(f'<rect x="{bx}" y="{y}" width="{w:.1f}" height="18" fill="{color(t, all_targets)}"/>')
            if hi > lo:
                xl, xh = bx + bw * lo / vmax, bx + bw * hi / vmax
                o.append(f'<line x1="{xl:.1f}" y1="{y + 9}" x2="{xh:.1f}" y2="{y + 9}" stroke="black"/>')
                o.append(f'<line x1="{xl:.1f}" y1="{y + 4}" x2="{xl:.1f}" y2="{y + 14}" stroke="black"/>')
                o.append(f'<line x1="{xh:.1f}" y1="{y + 4}" x2="{xh:.1f}" y2="{y + 14}" stroke="black"/>')
            o.append(f'<text x="{bx + max(w, bw * hi / vmax) + 4:.1f}" y="{y + 13}">{fmt(m)}</text>')
    o.append("</svg>")
    with open(path, "w") as fh:
        fh.write("\n".join(o) + "\n")


def check(rows, env, by_setup):
    """run.sh --smoke: every measurement ok, every set-up has every mode for all of its targets."""
    bad = [r for r in rows if not r.get("ok")]
    for r in bad:
        print("FAILED:", json.dumps(r), file=sys.stderr)
    if not rows:
        print("no results", file=sys.stderr)
        return 1
    modes = env.get("modes", "").split()
    for setup in env.get("setups", "").split() or list(by_setup):
        srows = [r for r in rows if setup_of(r) == setup]
        expected = set(env.get(f"targets_{setup}", env.get("targets", "")).split())
        if not expected:
            continue
        have = {r.get("mode") for r in srows}
        for m in modes:
            if m not in have and not (m in ("idle", "cap", "storm") and expected <= {"direct"}):
                print(f"set-up {setup}: no {m} measurement", file=sys.stderr)
                bad.append({})
        for mv in {variant(r) for r in srows}:
            got = {r.get("target") for r in srows if variant(r) == mv}
            want = expected - ({"direct"} if mv.startswith(("idle", "cap", "storm", "callgrind")) else set())
            if want - got:
                print(f"set-up {setup}: missing {mv} for {sorted(want - got)}", file=sys.stderr)
                bad.append({})
        # a storm run passes only with the cap re-admitted exactly, never exceeded, and no errors
        # (its own ok says so too; this names what went wrong)
        for r in srows:
            if r.get("mode") != "storm" or "cap" not in r:
                continue
            why = []
            if r.get("admitted") != r.get("cap"):
                why.append(f"admitted {r.get('admitted')} of cap {r.get('cap')}")
            if (r.get("max_concurrent_admitted") or 0) > r.get("cap", 0):
                why.append(f"{r.get('max_concurrent_admitted')} admitted at once, over the cap")
            if r.get("errors"):
                why.append(f"{r.get('errors')} errors {r.get('failure_kinds')}")
            if r.get("time_to_cap_s") is None:
                why.append("the cap was not reached within --max-time")
            if why:
                print(f"set-up {setup}: storm {r.get('target')}: " + "; ".join(why), file=sys.stderr)
                bad.append({})
    return 1 if bad else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--markdown")
    ap.add_argument("--svg")
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    rows, env = load(a.results)
    by_setup = {s: Stats([r for r in rows if setup_of(r) == s]) for s in setups_in(rows, env)}
    if a.svg:
        write_svg(a.svg, by_setup)
    if a.markdown:
        svg_rel = os.path.relpath(a.svg, os.path.dirname(os.path.abspath(a.markdown))) if a.svg else ""
        write_markdown(a.markdown, by_setup, env, rows, svg_rel)
    if a.check:
        return check(rows, env, by_setup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
