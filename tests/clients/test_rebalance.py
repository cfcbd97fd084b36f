"""Automatic rebalancing (docs/operations.md#automatic-rebalancing) seen by Python `websockets` clients.

Two wsgate binaries share a private `redis-server` (127.0.0.1, a free port, stopped by PID) with
`rebalance = true` and a heartbeat a second. Twenty `websockets` clients connect to the first, one
after the other; the second starts. The test checks what the client library reports: the ten
oldest get Close 1012 "server rebalancing, please reconnect" (`ConnectionClosed.rcvd`), the others
still echo, and the ten reconnect to the second instance, after which both hold ten and nothing
more is shed.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import time

from harness import Upstream, Wsgate, eventually
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

REASON = "server rebalancing, please reconnect"


class Redis:
    """A private redis-server on a free loopback port, stopped by PID."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is needed (.ci/run installs Debian's)"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = tempfile.TemporaryDirectory()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir.name],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.dir.cleanup()


def instance(up: Upstream, redis: Redis, name: str) -> Wsgate:
    return Wsgate(
        up.port,
        WSGATE_FLEET_REDIS_URL=f"redis://127.0.0.1:{redis.port}",
        WSGATE_FLEET_NAMESPACE="py-rebalance",
        WSGATE_FLEET_INSTANCE_ID=name,
        WSGATE_FLEET_LEASE_TTL="3s",
        WSGATE_REBALANCE="true",
        WSGATE_REBALANCE_AFTER="1s",
        WSGATE_REBALANCE_PERIOD="2s",
        WSGATE_REBALANCE_COOLDOWN="30s",
    )


async def close_of(ws) -> object:
    """The Close frame the client received, as `websockets` reports it."""
    await ws.wait_closed()
    try:
        await ws.recv()
    except ConnectionClosed as e:
        return e.rcvd
    raise AssertionError("a closed connection returned a message")


def test_the_oldest_half_get_1012_and_reconnect_to_the_new_instance() -> None:
    async def main() -> None:
        redis = Redis()
        gates: list[Wsgate] = []
        try:
            async with Upstream() as up:
                a = instance(up, redis, "a")
                gates.append(a)
                clients = [await asyncio.wait_for(connect(a.url), 10) for _ in range(20)]
                await eventually(lambda: a.metric("wsgate_fleet_mean") == 20, 10)
                watchers = [asyncio.create_task(close_of(ws)) for ws in clients]
                b = instance(up, redis, "b")
                gates.append(b)
                await eventually(lambda: sum(w.done() for w in watchers) >= 10, 15)
                await eventually(lambda: a.metric("wsgate_connections_active") == 10, 10)
                shed = [i for i, w in enumerate(watchers) if w.done()]
                assert shed == list(range(10)), f"the ten oldest: {shed}"
                for i in shed:
                    frame = watchers[i].result()
                    assert (frame.code, frame.reason) == (1012, REASON), frame
                for ws in clients[10:]:
                    await ws.send("still here")
                    assert await asyncio.wait_for(ws.recv(), 5) == "still here"
                # They reconnect, as a client told 1012 does: to the other instance.
                moved = [await asyncio.wait_for(connect(b.url), 10) for _ in shed]
                await eventually(lambda: b.metric("wsgate_connections_active") == 10, 10)
                await eventually(lambda: a.metric("wsgate_fleet_mean") == 10, 10)
                assert a.metric("wsgate_rebalance_shed_total") == 10
                settled = time.monotonic()
                while time.monotonic() - settled < 3:
                    assert a.metric("wsgate_rebalance_shed_total") == 10
                    assert b.metric("wsgate_rebalance_shed_total") == 0
                    await asyncio.sleep(0.2)
                print(f"\nshed {shed} with {watchers[0].result().code} "
                      f"{watchers[0].result().reason!r}; A and B hold 10 each")
                for ws in clients[10:] + moved:
                    await ws.close()
        finally:
            for g in gates:
                g.stop()
            redis.stop()

    asyncio.run(main())
