"""An operator drain (`POST /drain`, docs/operations.md#access-log) seen by Python `websockets` clients.

Each test starts the real binary with an admin token file in front of a `websockets` echo server
(both on 127.0.0.1, port 0), connects clients with `websockets` one after the other (so their ages
are in order), asks the admin port for a drain with the token, and checks what the client library
reports: the close code wsgate sent (`ConnectionClosed.rcvd.code`), which clients got it and when,
that the others still echo, that the instance stays ready and keeps admitting, and that
`DELETE /drain` stops a drain midway.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

from harness import Upstream, Wsgate, eventually
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

TOKEN = "py-admin-token-7c2e"
REASON = "server rebalancing, please reconnect"


def admin(gate: Wsgate, method: str, path: str, body: dict | None = None,
          token: str | None = TOKEN) -> tuple[int, object]:
    """One request to the admin port: (status, the JSON body, or the text if it is not JSON)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://{gate.admin}{path}", data=data, method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def gate_with_token(up: Upstream, tmp_path) -> Wsgate:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    return Wsgate(up.port, WSGATE_ADMIN_TOKEN_FILE=str(token_file))


async def open_clients(gate: Wsgate, n: int) -> list:
    """`n` clients connected one after the other: client i is older than client i + 1."""
    clients = []
    for _ in range(n):
        clients.append(await asyncio.wait_for(connect(gate.url), 10))
    return clients


async def closed_at(ws, t0: float) -> tuple[float, object]:
    """Waits for the connection to end without reading it (the test may still echo on it);
    returns when, after `t0`, and the Close frame the client received, as `websockets` reports it."""
    await ws.wait_closed()
    at = time.monotonic() - t0
    try:
        await ws.recv()
    except ConnectionClosed as e:
        return at, e.rcvd
    raise AssertionError("a closed connection returned a message")


async def echoes(ws, text: str) -> None:
    await ws.send(text)
    assert await asyncio.wait_for(ws.recv(), 5) == text


async def poll_readyz(gate: Wsgate, seen: list[int], stop: asyncio.Event) -> None:
    """Asks /readyz every 100 ms until `stop`; keeps each status in `seen`."""
    def once() -> int:
        try:
            with urllib.request.urlopen(f"http://{gate.admin}/readyz", timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
    while not stop.is_set():
        seen.append(await asyncio.to_thread(once))
        try:
            await asyncio.wait_for(stop.wait(), 0.1)
        except asyncio.TimeoutError:
            pass


def test_fraction_drain_closes_half_evenly_with_1001(tmp_path) -> None:
    async def main() -> None:
        async with Upstream() as up:
            gate = gate_with_token(up, tmp_path)
            try:
                clients = await open_clients(gate, 100)
                await eventually(lambda: gate.metric("wsgate_connections_active") == 100, 10)
                t0 = time.monotonic()
                watchers = [asyncio.create_task(closed_at(ws, t0)) for ws in clients]
                ready: list[int] = []
                stop = asyncio.Event()
                poller = asyncio.create_task(poll_readyz(gate, ready, stop))

                status, body = await asyncio.to_thread(
                    admin, gate, "POST", "/drain", {"fraction": 0.5, "period": "5s"})
                assert status == 202, body
                assert body == {"planned": 50, "period_ms": 5000}

                # A new client during the drain is admitted, echoes, and is not drained.
                await eventually(lambda: sum(w.done() for w in watchers) >= 10, 10)
                late = await asyncio.wait_for(connect(gate.url), 10)
                await echoes(late, "joined during the drain")
                late_watch = asyncio.create_task(closed_at(late, t0))

                running_seen = False
                deadline = time.monotonic() + 15
                while True:
                    status, state = await asyncio.to_thread(admin, gate, "GET", "/drain")
                    assert status == 200, state
                    if not state["running"]:
                        break
                    running_seen = True
                    assert time.monotonic() < deadline, f"the 5 s drain still runs: {state}"
                    await asyncio.sleep(0.1)
                assert running_seen, "GET /drain never showed the drain running"
                assert state == {"running": False, "planned": 50, "drained": 50, "period_ms": 5000}
                await eventually(lambda: sum(w.done() for w in watchers) >= 50, 10)
                stop.set()
                await poller

                closed = {i: w.result() for i, w in enumerate(watchers) if w.done()}
                times = sorted(at for at, _ in closed.values())
                per_second = [0] * 7
                for at in times:
                    per_second[min(int(at), 6)] += 1
                print(f"\nfraction 0.5 of 100 over 5 s: closes per second {per_second}, "
                      f"first {times[0]:.3f} s, last {times[-1]:.3f} s; "
                      f"/readyz polled {len(ready)} times: {sorted(set(ready))}")

                assert len(closed) == 50, f"{len(closed)} clients closed"
                assert sorted(closed) == list(range(50)), "the 50 oldest are the ones drained"
                for i, (_, rcvd) in closed.items():
                    assert rcvd is not None, f"client {i} got no Close frame"
                    assert rcvd.code == 1001, f"client {i}: {rcvd}"
                    assert rcvd.reason == REASON, f"client {i}: {rcvd}"
                mean = 50 / 5
                assert max(per_second) <= 2 * mean, f"closes bunched: {per_second}"
                assert times[-1] < 6, f"last close at {times[-1]:.3f} s for a 5 s period"
                assert ready and set(ready) == {200}, f"/readyz during the drain: {ready}"

                for i in range(50, 100):
                    assert not watchers[i].done(), f"client {i} was closed"
                    await echoes(clients[i], f"survivor {i}")
                assert not late_watch.done(), "the client admitted during the drain was closed"
                await echoes(late, "still here")
                # The upstream side of each drained connection got wsgate's Close too.
                await eventually(lambda: len(up.closes) >= 50, 10)
                assert up.closes == [(1001, REASON)] * 50, f"upstream saw {up.closes}"
                assert gate.metric("wsgate_admin_drained_total") == 50
                assert gate.metric("wsgate_connections_drained_total") == 0
                assert gate.metric("wsgate_connections_active") == 51

                for ws in clients[50:] + [late]:
                    await ws.close()
                await asyncio.wait_for(asyncio.gather(*watchers, late_watch), 10)
            finally:
                gate.stop()

    asyncio.run(main())


def test_delete_stops_a_drain_midway(tmp_path) -> None:
    async def main() -> None:
        async with Upstream() as up:
            gate = gate_with_token(up, tmp_path)
            try:
                clients = await open_clients(gate, 20)
                t0 = time.monotonic()
                watchers = [asyncio.create_task(closed_at(ws, t0)) for ws in clients]
                status, body = await asyncio.to_thread(
                    admin, gate, "POST", "/drain", {"fraction": 0.5, "period": "5s"})
                assert status == 202, body
                assert body == {"planned": 10, "period_ms": 5000}

                await eventually(lambda: sum(w.done() for w in watchers) >= 4, 10)
                status, body = await asyncio.to_thread(admin, gate, "DELETE", "/drain")
                stopped_at = time.monotonic() - t0
                assert status == 200, body
                assert body["stopped"] is True and body["planned"] == 10, body
                k = body["drained"]
                assert 4 <= k < 10, f"DELETE at {stopped_at:.2f} s: {body}"
                await eventually(lambda: sum(w.done() for w in watchers) >= k, 5)

                # Until a second past the original period's end, no one else is closed.
                while time.monotonic() - t0 < 6:
                    assert sum(w.done() for w in watchers) == k, "a Close after DELETE"
                    await asyncio.sleep(0.1)
                assert gate.metric("wsgate_admin_drained_total") == k
                status, state = await asyncio.to_thread(admin, gate, "GET", "/drain")
                assert state == {"running": False, "planned": 10, "drained": k, "period_ms": 5000}
                print(f"\nDELETE after {stopped_at:.2f} s: {k} of 10 drained, none after")

                closed = [i for i, w in enumerate(watchers) if w.done()]
                assert closed == list(range(k)), f"oldest first: {closed}"
                for i in closed:
                    assert watchers[i].result()[1].code == 1001
                for i in range(k, 20):
                    await echoes(clients[i], f"survivor {i}")
                for ws in clients[k:]:
                    await ws.close()
                await asyncio.wait_for(asyncio.gather(*watchers), 10)
            finally:
                gate.stop()

    asyncio.run(main())


def test_drain_needs_the_token(tmp_path) -> None:
    async def main() -> None:
        async with Upstream() as up:
            gate = gate_with_token(up, tmp_path)
            try:
                clients = await open_clients(gate, 4)
                t0 = time.monotonic()
                watchers = [asyncio.create_task(closed_at(ws, t0)) for ws in clients]
                for token in (None, "not-the-token"):
                    status, body = await asyncio.to_thread(
                        admin, gate, "POST", "/drain", {"count": 4, "period": "500ms"}, token)
                    assert status == 401, body
                while time.monotonic() - t0 < 1.5:
                    assert not any(w.done() for w in watchers), "a 401 drained a client"
                    await asyncio.sleep(0.05)
                assert gate.metric("wsgate_admin_drained_total") == 0
                for ws in clients:
                    await echoes(ws, "still here")
                    await ws.close()
                await asyncio.wait_for(asyncio.gather(*watchers), 10)
            finally:
                gate.stop()

    asyncio.run(main())
