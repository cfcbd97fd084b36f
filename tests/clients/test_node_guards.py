"""The message guards of docs/operations.md#message-guards seen by Node's `ws` library (pinned in node/package-lock.json).

`node/client.mjs` in its guard modes connects through wsgate and reports, one JSON line each,
what `ws` observed: under max_message_size = 65536 (no compression), 65536 bytes echoed intact
and the close after sending 65537; under message_rate_action = close, the close after sending
200 messages at once. This test checks the close codes and what the upstream received.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from harness import Upstream, Wsgate, eventually
from test_node_ws import CLIENT, NODE, until_event


async def run_mode(gate: Wsgate, mode: str) -> list[dict]:
    """Runs client.mjs in `mode` until it reports done; returns what it reported."""
    client = await asyncio.create_subprocess_exec(
        NODE, str(CLIENT), gate.url, mode, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE)
    seen: list[dict] = []
    try:
        await until_event(client.stdout, seen, "done")
        print(f"\nnode ws reported ({mode}): {seen}")
        assert await asyncio.wait_for(client.wait(), 10) == 0
        return seen
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()


def closes(seen: list[dict]) -> list[dict]:
    return [e for e in seen if e.get("event") == "close"]


@pytest.mark.skipif(NODE is None and not os.environ.get("CI"), reason="node not installed")
def test_node_ws_client_message_too_big_gets_1009() -> None:
    async def main() -> None:
        assert NODE is not None, "node not found on PATH"
        async with Upstream() as up:
            gate = Wsgate(up.port, WSGATE_MAX_MESSAGE_SIZE="65536")
            try:
                seen = await run_mode(gate, "guard-size")
                assert {"name": "g", "event": "binary", "length": 65536, "intact": True} in seen
                assert closes(seen) == [{"name": "g", "event": "close", "code": 1009,
                                         "reason": "message too big"}], seen
                await eventually(lambda: up.closes, 5)
                assert up.closes == [(1001, "client message too big")], f"upstream saw {up.closes}"
                assert [len(m) for m in up.received] == [65536], "the refused message never arrives"
                await eventually(lambda: gate.metric("wsgate_connections_active") == 0, 5)
                assert gate.metric("wsgate_connections_active") == 0
            finally:
                gate.stop()

    asyncio.run(main())


@pytest.mark.skipif(NODE is None and not os.environ.get("CI"), reason="node not installed")
def test_node_ws_client_over_the_message_rate_gets_1008() -> None:
    async def main() -> None:
        assert NODE is not None, "node not found on PATH"
        async with Upstream() as up:
            gate = Wsgate(up.port, WSGATE_MESSAGE_RATE="100", WSGATE_MESSAGE_BURST="10",
                          WSGATE_MESSAGE_RATE_ACTION="close")
            try:
                seen = await run_mode(gate, "guard-rate-close")
                assert closes(seen) == [{"name": "g", "event": "close", "code": 1008,
                                         "reason": "message rate exceeded"}], seen
                await eventually(lambda: up.closes, 5)
                assert up.closes == [(1001, "client exceeded message rate")], f"upstream saw {up.closes}"
                n = len(up.received)
                print(f"upstream got {n} of 200")
                assert up.received == [f"message {i}" for i in range(n)], "in order, complete"
                # 200 messages written at once: the burst, plus what refilled meanwhile (~10 ms each).
                assert 10 <= n <= 15, f"the upstream got {n} messages"
            finally:
                gate.stop()

    asyncio.run(main())
