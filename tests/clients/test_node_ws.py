"""wsgate seen by Node's `ws` library (pinned in node/package-lock.json).

`node/client.mjs` connects through wsgate with a cap of 2 and reports, one JSON line each, what
`ws` observed: the third connection refused with 503 and Retry-After, a text and a 1 MiB binary
message echoed intact, and, after this test sends SIGTERM, a close with 1001 and wsgate's reason
on both connections.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import shutil
import signal

import pytest
from harness import Upstream, Wsgate

CLIENT = pathlib.Path(__file__).parent / "node" / "client.mjs"
NODE = shutil.which("node")


async def until_event(lines: asyncio.StreamReader, seen: list[dict], name: str) -> None:
    """Reads the node client's events into `seen` until `name`, within 20 s."""
    async def read() -> None:
        while True:
            line = await lines.readline()
            assert line, f"the node client exited early; it reported {seen}"
            seen.append(json.loads(line))
            if seen[-1].get("event") == name:
                return
    await asyncio.wait_for(read(), 20)


@pytest.mark.skipif(NODE is None and not os.environ.get("CI"), reason="node not installed")
def test_node_ws_client_echo_cap_and_drain() -> None:
    async def main() -> None:
        assert NODE is not None, "node not found on PATH"
        async with Upstream() as up:
            gate = Wsgate(up.port, WSGATE_MAX_CLIENTS="2", WSGATE_RETRY_AFTER="3s",
                          WSGATE_DRAIN_PERIOD="500ms", WSGATE_SHUTDOWN_GRACE="5s")
            client = await asyncio.create_subprocess_exec(
                NODE, str(CLIENT), gate.url, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE)
            seen: list[dict] = []
            try:
                await until_event(client.stdout, seen, "ready")
                print(f"\nnode ws reported: {seen}")
                assert {"name": "c", "event": "refused", "status": 503, "retryAfter": "3"} in seen
                assert {"name": "a", "event": "text", "data": "hello from node ws",
                        "binary": False} in seen
                assert {"name": "a", "event": "binary", "length": 1 << 20, "intact": True} in seen
                assert gate.metric('wsgate_connections_rejected_total{reason="capacity"}') == 1
                assert gate.metric("wsgate_connections_active") == 2

                gate.proc.send_signal(signal.SIGTERM)
                await until_event(client.stdout, seen, "done")
                print(f"after SIGTERM: {seen[-3:]}")
                for name in ("a", "b"):
                    closes = [e for e in seen if e.get("name") == name and e["event"] == "close"]
                    assert len(closes) == 1, seen
                    assert closes[0]["code"] == 1001, closes
                    assert "draining" in closes[0]["reason"], closes
                assert await asyncio.wait_for(client.wait(), 10) == 0
                assert await gate.exit_code() == 0, "wsgate exits 0 after the drain"
            finally:
                if client.returncode is None:
                    client.kill()
                    await client.wait()
                gate.stop()

    asyncio.run(main())
