"""The handshake policy of docs/security.md#handshake-policy seen by Node's `ws` library (pinned in
node/package-lock.json); the Python `websockets` side, with every case, is test_handshake_policy.py.

`node/policy.mjs` opens one WebSocket per attempt given to it (an Origin header through the
`headers` option, a subprotocol offer) and reports, one JSON line each, what `ws` observed: the
subprotocol of an admitted connection and a message echoed through it, or the status of a refused
upgrade (`unexpected-response`). This test checks those against what the upstream received and the
metrics.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib

import pytest
from harness import Upstream, Wsgate
from test_handshake_policy import (BAD_SUBPROTOCOL, BEARER, JWT_REFUSALS, ORIGIN_REFUSALS,
                                   SUBPROTOCOL_REFUSALS, SelectingUpstream, assert_metric_becomes,
                                   gate_in_front, hs256_token, jwt_config)
from test_node_ws import NODE, until_event

POLICY = pathlib.Path(__file__).parent / "node" / "policy.mjs"
needs_node = pytest.mark.skipif(NODE is None and not os.environ.get("CI"),
                                reason="node not installed")


async def run_attempts(gate: Wsgate, attempts: list[dict]) -> dict[str, dict]:
    """Runs policy.mjs with `attempts` until it reports done; returns each attempt's outcome by name
    (without the name), e.g. {"a": {"event": "refused", "status": 403}}."""
    assert NODE is not None, "node not found on PATH"
    client = await asyncio.create_subprocess_exec(
        NODE, str(POLICY), gate.url, json.dumps(attempts), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE)
    seen: list[dict] = []
    try:
        await until_event(client.stdout, seen, "done")
        print(f"\nnode ws reported: {seen}")
        assert await asyncio.wait_for(client.wait(), 10) == 0
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
    outcomes = {e.pop("name"): e for e in seen if "name" in e}
    assert list(outcomes) == [a["name"] for a in attempts], f"one outcome each: {seen}"
    return outcomes


def opened(protocol: str = "") -> dict:
    """An admitted attempt: `ws` accepted `protocol` ("" = none) and a message came back."""
    return {"event": "open", "protocol": protocol, "echo": "through"}


def refused(status: int) -> dict:
    return {"event": "refused", "status": status}


@needs_node
def test_node_ws_origins() -> None:
    async def main() -> None:
        async with Upstream() as up, gate_in_front(
                up, WSGATE_ALLOWED_ORIGINS="https://app.example.com,http://localhost:8080",
                WSGATE_REQUIRE_ORIGIN="true") as gate:
            got = await run_attempts(gate, [
                {"name": "listed", "origin": "https://app.example.com"},
                {"name": "listed port", "origin": "http://localhost:8080"},
                {"name": "other port", "origin": "http://localhost:8081"},
                {"name": "null", "origin": "null"},
                {"name": "missing, required"},
            ])
            assert got == {"listed": opened(), "listed port": opened(),
                           "other port": refused(403), "null": refused(403),
                           "missing, required": refused(403)}
            assert [h.get("Origin") for h in up.requests] == \
                ["https://app.example.com", "http://localhost:8080"], "refusals reach nothing"
            await assert_metric_becomes(gate, ORIGIN_REFUSALS, 3)

    asyncio.run(main())


@needs_node
def test_node_ws_subprotocols() -> None:
    async def main() -> None:
        async with Upstream(subprotocols=["evil", "chat"]) as up, gate_in_front(
                up, WSGATE_SUBPROTOCOLS="chat", WSGATE_REQUIRE_SUBPROTOCOL="true") as gate:
            got = await run_attempts(gate, [
                {"name": "listed", "protocols": ["evil", "chat"]},
                {"name": "none listed", "protocols": ["evil"]},
            ])
            assert got == {"listed": opened("chat"), "none listed": refused(400)}
            assert [h.get_all("Sec-WebSocket-Protocol") for h in up.requests] == [["chat"]]
            await assert_metric_becomes(gate, SUBPROTOCOL_REFUSALS, 1)

        async with SelectingUpstream("evil") as up, gate_in_front(up) as gate:
            got = await run_attempts(gate, [{"name": "unoffered", "protocols": ["chat"]}])
            assert got == {"unoffered": refused(502)}
            assert len(up.requests) == 1
            await assert_metric_becomes(gate, BAD_SUBPROTOCOL, 1)

    asyncio.run(main())


@needs_node
def test_node_ws_jwt_in_the_subprotocol(tmp_path) -> None:
    alice = hs256_token("alice")
    forged = hs256_token("bob", secret=b"not the secret")

    async def main() -> None:
        async with Upstream(subprotocols=["chat"]) as up, gate_in_front(
                up, **jwt_config(tmp_path)) as gate:
            got = await run_attempts(gate, [
                {"name": "token", "protocols": ["chat", BEARER + alice]},
                {"name": "wrong signature", "protocols": ["chat", BEARER + forged]},
            ])
            assert got == {"token": opened("chat"), "wrong signature": refused(401)}
            assert [h.get_all("Sec-WebSocket-Protocol") for h in up.requests] == [["chat"]], \
                "the token entry was stripped"
            await assert_metric_becomes(gate, JWT_REFUSALS, 1)

    asyncio.run(main())
