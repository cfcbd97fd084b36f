"""The message guards of docs/operations.md#message-guards, seen by Python `websockets` (the Node `ws` side is in
test_node_guards.py).

Each test starts the real binary in front of the harness's `websockets` echo server, with one
guard set through its WSGATE_* variable, connects with `websockets` as a user would, and checks
what both ends saw: the client the Close code and reason of the guard (1009 size, 1008 rate),
the upstream a Close 1001 and none of the refused message, or, when throttled, every message in
order at the configured rate, measured by the upstream's arrival times.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from contextlib import asynccontextmanager

from harness import Upstream, Wsgate, eventually
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

LIMIT = 65536
MIB = 1 << 20
RATE = 100
BURST = 10
SIZE_CLOSES = 'wsgate_message_guard_total{guard="size",action="close"}'
RATE_CLOSES = 'wsgate_message_guard_total{guard="rate",action="close"}'
RATE_THROTTLES = 'wsgate_message_guard_total{guard="rate",action="throttle"}'
ACTIVE = "wsgate_connections_active"
SIZE_GUARD = {"WSGATE_MAX_MESSAGE_SIZE": str(LIMIT)}


def rate_guard(action: str) -> dict[str, str]:
    """The message rate guard at RATE per second, bursts of BURST, with `action`."""
    return {"WSGATE_MESSAGE_RATE": str(RATE), "WSGATE_MESSAGE_BURST": str(BURST),
            "WSGATE_MESSAGE_RATE_ACTION": action}


def pattern(n: int) -> bytes:
    """`n` bytes that are not all alike, so a byte out of place shows."""
    return bytes((i * 31 + 7) & 0xFF for i in range(n))


def metric(gate: Wsgate, series: str) -> float | None:
    """The series' value, or None while it is missing (for polling with eventually())."""
    try:
        return gate.metric(series)
    except AssertionError:
        return None


@asynccontextmanager
async def guarded(env: dict[str, str], **upstream):
    """The harness's echo upstream (made with `upstream`) and wsgate in front of it with the
    WSGATE_* variables of `env`: yields (upstream, wsgate) and stops wsgate on the way out."""
    async with Upstream(**upstream) as up:
        gate = Wsgate(up.port, **env)
        try:
            yield up, gate
        finally:
            gate.stop()


async def assert_metric_becomes(gate: Wsgate, series: str, value: float, why: str = "") -> None:
    """Polls `series` for up to 5 s until it equals `value`, then asserts it (with `why`)."""
    await eventually(lambda: metric(gate, series) == value, 5)
    assert metric(gate, series) == value, why or f"{series} = {metric(gate, series)}, not {value}"


async def send_refused(ws, message) -> None:
    """Sends a message wsgate is expected to refuse: the send may itself meet the Close."""
    try:
        await asyncio.wait_for(ws.send(message), 10)
    except ConnectionClosed:
        pass


async def assert_client_closed(ws, code: int, reason: str) -> None:
    """The client received a Close with `code` and `reason`, and the closing handshake ended."""
    async def drain() -> None:
        """Reads what is still coming (echoes of messages that passed) until the Close."""
        try:
            async for _ in ws:
                pass
        except ConnectionClosed as exc:
            print(f"\nclient log: {exc!r}")

    try:
        await asyncio.wait_for(drain(), 10)
        await asyncio.wait_for(ws.wait_closed(), 10)
    except TimeoutError:
        raise AssertionError(f"no Close {code} reached the client within 10 s") from None
    rcvd = ws.protocol.close_rcvd
    assert rcvd is not None, f"the client never received a Close (state {ws.protocol.state})"
    assert (rcvd.code, rcvd.reason) == (code, reason), f"client received {rcvd}"
    assert ws.protocol.close_sent is not None, "the client's Close reply went out"


async def assert_upstream_closed(up: Upstream, reason: str) -> None:
    await eventually(lambda: up.closes, 5)
    assert up.closes == [(1001, reason)], f"upstream saw {up.closes}"


async def refuse_one_too_big(gate: Wsgate, up: Upstream) -> None:
    """Without compression: LIMIT bytes echo back intact, LIMIT + 1 are refused with 1009 / 1001."""
    async with connect(gate.url, compression=None, max_size=None) as ws:
        fits = pattern(LIMIT)
        await asyncio.wait_for(ws.send(fits), 10)
        assert await asyncio.wait_for(ws.recv(), 10) == fits, "a message of exactly the limit passes"
        await send_refused(ws, pattern(LIMIT + 1))
        await assert_client_closed(ws, 1009, "message too big")
    await assert_upstream_closed(up, "client message too big")
    assert len(up.received) == 1 and up.received[0] == fits, \
        f"the upstream got {[len(m) for m in up.received]} bytes: the refused message must not arrive"


def test_size_limit_refuses_one_byte_over_with_1009() -> None:
    async def main() -> None:
        async with guarded(SIZE_GUARD) as (up, gate):
            await refuse_one_too_big(gate, up)

    asyncio.run(main())


def test_size_refusal_is_counted_and_releases_the_slot() -> None:
    async def main() -> None:
        async with guarded(SIZE_GUARD) as (up, gate):
            assert metric(gate, SIZE_CLOSES) == 0, "the series exists at 0 from start-up"
            await refuse_one_too_big(gate, up)
            await assert_metric_becomes(gate, SIZE_CLOSES, 1)
            await assert_metric_becomes(gate, ACTIVE, 0, "the slot is released")
            assert metric(gate, RATE_CLOSES) == 0

    asyncio.run(main())


def test_size_limit_counts_all_fragments_and_pings_pass_between_them() -> None:
    """8 fragments of 8 KiB pass; 7 × 8 KiB + (8 KiB + 1) are refused at the 8th fragment, after a
    ping sent between fragments 4 and 5 was answered by the upstream."""
    async def main() -> None:
        async with guarded(SIZE_GUARD) as (up, gate):
            async with connect(gate.url, compression=None, max_size=None) as ws:
                fits = pattern(LIMIT)
                chunks = [fits[i:i + LIMIT // 8] for i in range(0, LIMIT, LIMIT // 8)]
                await asyncio.wait_for(ws.send(chunks), 10)
                assert await asyncio.wait_for(ws.recv(), 10) == fits

                pongs: list[float] = []

                async def over() -> object:
                    for i, chunk in enumerate(chunks):
                        if i == 4:
                            pong = await ws.ping(b"between fragments")
                            pongs.append(await asyncio.wait_for(pong, 5))
                        yield chunk + (b"!" if i == 7 else b"")

                await send_refused(ws, over())
                assert len(pongs) == 1, "the ping between fragments was answered"
                await assert_client_closed(ws, 1009, "message too big")
            await assert_upstream_closed(up, "client message too big")
            assert up.received == [fits], "the refused message never completes at the upstream"
            await assert_metric_becomes(gate, ACTIVE, 0)

    asyncio.run(main())


def test_size_limit_counts_compressed_bytes_with_permessage_deflate() -> None:
    async def main() -> None:
        async with guarded(SIZE_GUARD, max_size=None) as (up, gate):
            async with connect(gate.url, compression="deflate", max_size=None) as ws:
                assert "permessage-deflate" in str(ws.response.headers.get("Sec-WebSocket-Extensions")), \
                    "permessage-deflate negotiated end to end through wsgate"
                compressible = b"a" * MIB
                await asyncio.wait_for(ws.send(compressible), 10)
                assert await asyncio.wait_for(ws.recv(), 10) == compressible, \
                    "1 MiB that compresses far under the limit passes"
                wire = metric(gate, 'wsgate_transferred_bytes_total{direction="client_to_upstream"}')
                print(f"\n1 MiB of 'a' took {wire} bytes client → upstream (handshake included)")
                await send_refused(ws, os.urandom(MIB))
                await assert_client_closed(ws, 1009, "message too big")
            await assert_upstream_closed(up, "client message too big")
            assert len(up.received) == 1 and up.received[0] == compressible, \
                f"the upstream got {[len(m) for m in up.received]} bytes"

    asyncio.run(main())


def test_message_rate_close_refuses_the_first_message_over_the_bucket_with_1008() -> None:
    async def main() -> None:
        async with guarded(rate_guard("close")) as (up, gate):
            async with connect(gate.url) as ws:
                sent: list[str] = []
                started = time.monotonic()
                try:
                    for i in range(200):
                        msg = f"message {i}"
                        await asyncio.wait_for(ws.send(msg), 10)
                        sent.append(msg)
                except ConnectionClosed:
                    pass
                await assert_client_closed(ws, 1008, "message rate exceeded")
                elapsed = time.monotonic() - started
            await assert_upstream_closed(up, "client exceeded message rate")
            n = len(up.received)
            print(f"sent {len(sent)}, upstream got {n}, closed after {elapsed:.3f}s")
            assert up.received == sent[:n], "what passed arrived complete and in order"
            assert BURST <= n <= BURST + math.ceil(RATE * elapsed) + 1, \
                f"the bucket allows {BURST} at once then {RATE}/s; the upstream got {n} in {elapsed:.3f}s"
            await assert_metric_becomes(gate, RATE_CLOSES, 1)

    asyncio.run(main())


def test_message_rate_throttle_delivers_everything_in_order_at_the_rate() -> None:
    n = 300

    async def main() -> None:
        async with guarded(rate_guard("throttle")) as (up, gate):
            async with connect(gate.url) as ws:
                echoed: list[str] = []

                async def reader() -> None:
                    async for msg in ws:
                        echoed.append(msg)
                        if len(echoed) == n:
                            return

                task = asyncio.create_task(reader())
                sent = [f"message {i}" for i in range(n)]
                started = time.monotonic()
                for msg in sent:
                    await asyncio.wait_for(ws.send(msg), 10)
                print(f"\nclient sent {n} in {time.monotonic() - started:.3f}s")
                await asyncio.wait_for(task, n / RATE + 10)
                assert echoed == sent
            assert up.received == sent, "every message arrives, in order"
            t = up.arrivals
            burst_span = t[BURST - 1] - t[0]
            rate = (n - BURST) / (t[-1] - t[0])
            steady = (n - 1 - BURST) / (t[-1] - t[BURST])
            print(f"first {BURST} within {burst_span * 1000:.1f} ms; first → last: "
                  f"{t[-1] - t[0]:.3f}s = {rate:.1f}/s after the burst; from message "
                  f"{BURST + 1} on: {steady:.1f}/s")
            assert burst_span < 0.05, "the burst passes at once"
            assert RATE * 0.9 <= rate <= RATE * 1.1, f"{rate:.1f}/s, not {RATE}/s ± 10 %"
            assert metric(gate, RATE_THROTTLES) >= 1, "the throttling is counted"
            assert metric(gate, RATE_CLOSES) == 0

    asyncio.run(main())
