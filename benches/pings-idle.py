#!/usr/bin/env python3
"""The CPU cost of pings from wsgate: wsgate's CPU time per idle client per hour, with pings on and
with pings off, N idle clients that answer every Ping (as browsers and client libraries do).

    cargo build --release          # into $CARGO_TARGET_DIR (or target/)
    python3 benches/pings-idle.py [--bin PATH] [--clients 1000] [--seconds 30] [--interval 1s]

For each of `ping_interval = INTERVAL` and `ping_interval = 0s` (off), it starts the release binary
on 127.0.0.1 (ports 0) in front of a silent upstream, opens the clients, lets them settle, then reads
wsgate's utime + stime from /proc/PID/stat before and after SECONDS of idleness, and prints one line
per run and one JSON line with both. The clients and the upstream are raw asyncio sockets in this
process (no third-party package): a client answers each Ping with a masked Pong of the same payload
and sends nothing else; the upstream answers the upgrade and then only reads. Only wsgate's own CPU
is measured; it checks at the end that every client is still connected and how many Pings wsgate
counted (`wsgate_pings_sent_total`).

Loopback only; the processes it starts are stopped by PID at the end.
"""
import argparse
import asyncio
import base64
import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import time
import urllib.request

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TICKS = os.sysconf("SC_CLK_TCK")


def default_bin():
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(os.path.dirname(__file__), "..", "target")
    return os.path.join(target, "release", "wsgate")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def scrape(admin, name):
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


# ---- the upstream: answers the upgrade, then reads and drops ------------------------------------

async def upstream_conn(reader, writer):
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        key = re.search(rb"(?i)sec-websocket-key:\s*(\S+)", head).group(1)
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        while await reader.read(65536):
            pass
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
        pass
    writer.close()


# ---- a client: upgrade, then answer each Ping ----------------------------------------------------

class Client:
    def __init__(self):
        self.pongs = 0
        self.closed = False

    async def run(self, host, port, ready):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write((f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(head.split(b"\r\n")[0].decode())
        ready.set_result(None)
        buf = b""
        while True:
            try:
                data = await reader.read(4096)
            except ConnectionError:
                data = b""
            if not data:
                self.closed = True
                return
            buf += data
            while len(buf) >= 2:
                n = buf[1] & 0x7F  # wsgate's Pings are small and unmasked
                if n >= 126 or len(buf) < 2 + n:
                    break
                opcode, payload, buf = buf[0] & 0x0F, buf[2:2 + n], buf[2 + n:]
                if opcode == 0x9:
                    key = os.urandom(4)
                    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
                    writer.write(bytes([0x8A, 0x80 | n]) + key + masked)
                    self.pongs += 1
                elif opcode == 0x8:
                    self.closed = True
                    return


async def measure(args, interval):
    up = await asyncio.start_server(upstream_conn, "127.0.0.1", 0, backlog=4096)
    up_port = up.sockets[0].getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGATE_")}
    env.update({
        "WSGATE_UPSTREAM": f"127.0.0.1:{up_port}", "WSGATE_LISTEN": "127.0.0.1:0",
        "WSGATE_ADMIN_LISTEN": "127.0.0.1:0", "WSGATE_PING_INTERVAL": interval,
        "WSGATE_LOG_LEVEL": "warn,wsgate=info", "WSGATE_ACCESS_LOG": "false",
    })
    tasks = []
    gate = subprocess.Popen([args.bin], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        addrs = {}
        deadline = time.monotonic() + 10
        while len(addrs) < 2:
            line = await asyncio.to_thread(gate.stderr.readline)
            m = re.search(r"(proxy|admin) listening addr=(\S+)", line)
            if m:
                addrs[m.group(1)] = m.group(2)
            if not line or time.monotonic() > deadline:
                raise RuntimeError("wsgate did not start")
        host, port = addrs["proxy"].rsplit(":", 1)
        clients = [Client() for _ in range(args.clients)]
        for i in range(0, args.clients, 100):
            batch = []
            for c in clients[i:i + 100]:
                ready = asyncio.get_running_loop().create_future()
                tasks.append(asyncio.create_task(c.run(host, int(port), ready)))
                batch.append(ready)
            await asyncio.wait_for(asyncio.gather(*batch), 30)
        active = scrape(addrs["admin"], "wsgate_connections_active")
        await asyncio.sleep(args.settle)
        pings_before = scrape(addrs["admin"], "wsgate_pings_sent_total")
        cpu_before, t0 = cpu_seconds(gate.pid), time.monotonic()
        await asyncio.sleep(args.seconds)
        cpu_after, elapsed = cpu_seconds(gate.pid), time.monotonic() - t0
        pings = scrape(addrs["admin"], "wsgate_pings_sent_total") - pings_before
        still = scrape(addrs["admin"], "wsgate_connections_active")
        rss = rss_kib(gate.pid)
        cpu = cpu_after - cpu_before
        per_client_hour_us = cpu / elapsed * 3600 / args.clients * 1e6
        result = {
            "ping_interval": interval, "clients": args.clients, "active_at_start": active,
            "active_at_end": still, "window_s": round(elapsed, 2), "wsgate_cpu_s": round(cpu, 3),
            "pings_sent_in_window": pings, "pongs_answered": sum(c.pongs for c in clients),
            "clients_closed": sum(c.closed for c in clients), "wsgate_rss_kib": rss,
            "cpu_us_per_client_hour": round(per_client_hour_us),
            "cpu_us_per_ping": round(cpu * 1e6 / pings, 2) if pings else None,
        }
        # One clock tick of CPU time over the window, per client per hour: the resolution.
        result["resolution_us_per_client_hour"] = round(1 / TICKS / elapsed * 3600 / args.clients * 1e6)
        ok = active == still == args.clients and not result["clients_closed"]
        print(f"ping_interval={interval:>4}: {args.clients} idle clients for {elapsed:.1f} s: wsgate CPU "
              f"{cpu:.2f} s = {per_client_hour_us:,.0f} µs per client per hour; {pings:.0f} Pings "
              f"({result['cpu_us_per_ping']} µs CPU each); resolution "
              f"{result['resolution_us_per_client_hour']:,} µs per client per hour; RSS {rss} KiB; "
              f"{'all connected' if ok else 'NOT all connected'}", flush=True)
        return result, ok
    finally:
        gate.terminate()
        try:
            await asyncio.to_thread(gate.wait, 10)
        except subprocess.TimeoutExpired:
            gate.kill()
        # wsgate is gone: every client and upstream connection reads EOF and ends.
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        up.close()
        await asyncio.sleep(0.2)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", default=default_bin(), help="the wsgate binary (default: the release build)")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=30.0, help="the measured window")
    p.add_argument("--settle", type=float, default=3.0, help="wait after the clients are connected")
    p.add_argument("--interval", default="1s", help="ping_interval of the run with pings on")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * args.clients + 64
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, need), hard))
    if not os.access(args.bin, os.X_OK):
        sys.exit(f"no wsgate binary at {args.bin}: cargo build --release first, or --bin PATH")
    results, all_ok = [], True
    for interval in (args.interval, "0s"):
        r, ok = asyncio.run(measure(args, interval))
        results.append(r)
        all_ok &= ok
    print(json.dumps({"bench": "pings-idle", "runs": results}))
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
