"""Refusals a browser can see (docs/behaviour.md#refusals-a-browser-can-see), seen by clients nobody here wrote.

With `refusal_mode = "close"` and the cap full, an upgrade is accepted by wsgate itself and closed
at once with 1013 (Try Again Later) and `retry after N s`, N between `retry_after` and twice it.
Python `websockets`, Node's `ws` and a page in headless Chromium each complete the handshake and
report that code and reason, with a clean closing handshake; the upstream never sees them. The
page runs the JavaScript of docs/browser-clients.md on what it saw.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import shutil

import pytest
from harness import Upstream, Wsgate
from browser import CHROMIUM, devtools, events
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError

NODE_CLIENT = pathlib.Path(__file__).parent / "node" / "client.mjs"
NODE = shutil.which("node")

# Close mode, one slot; Retry-After 2 s, so N is 2, 3 or 4.
ENV = {"WSGATE_MAX_CLIENTS": "1", "WSGATE_REFUSAL_MODE": "close", "WSGATE_RETRY_AFTER": "2s"}


def retry_after_of(reason: str) -> int:
    m = re.fullmatch(r"retry after (\d+) s", reason)
    assert m, f"reason {reason!r} is not `retry after N s`"
    return int(m.group(1))


def check_counts(gate: Wsgate, refused: int, held: bool = True) -> None:
    """The refusals counted; only the held client was admitted, and holds the slot if still open."""
    assert gate.metric('wsgate_connections_rejected_total{reason="capacity"}') == refused
    assert gate.metric("wsgate_connections_admitted_total") == 1
    if held:
        assert gate.metric("wsgate_connections_active") == 1


def test_websockets_client_reads_1013_and_the_retry_after() -> None:
    async def main() -> None:
        async with Upstream() as up:
            gate = Wsgate(up.port, **ENV)
            try:
                async with connect(gate.url) as held:
                    await held.send("holding the slot")
                    assert await held.recv() == "holding the slot"
                    seen = []
                    for _ in range(5):
                        async with connect(gate.url) as ws:
                            assert ws.subprotocol is None
                            with pytest.raises(ConnectionClosedError) as closed:
                                await asyncio.wait_for(ws.recv(), 10)
                        exc = closed.value
                        assert exc.rcvd is not None and exc.rcvd.code == 1013, exc
                        # websockets answered with the same code: a complete closing handshake.
                        assert exc.sent is not None and exc.sent.code == 1013, exc
                        assert exc.rcvd_then_sent is True, exc
                        seen.append(retry_after_of(exc.rcvd.reason))
                    print(f"\nwebsockets read retry after {seen} s")
                    assert all(2 <= n <= 4 for n in seen), seen
                    check_counts(gate, refused=5)
                    assert len(up.closes) == 0, "the refused clients never reached the upstream"
            finally:
                gate.stop()

    asyncio.run(main())


@pytest.mark.skipif(NODE is None and not os.environ.get("CI"), reason="node not installed")
def test_node_ws_client_reads_1013_and_the_retry_after() -> None:
    async def main() -> None:
        assert NODE is not None, "node not found on PATH"
        async with Upstream() as up:
            gate = Wsgate(up.port, **ENV)
            try:
                client = await asyncio.create_subprocess_exec(
                    NODE, str(NODE_CLIENT), gate.url, "close-refusal",
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE)
                out, _ = await asyncio.wait_for(client.communicate(), 30)
                seen = [json.loads(line) for line in out.decode().splitlines()]
                print(f"\nnode ws reported: {seen}")
                assert client.returncode == 0, seen
                assert {"name": "r", "event": "open", "protocol": ""} in seen, seen
                (close,) = [e for e in seen if e.get("name") == "r" and e["event"] == "close"]
                assert close["code"] == 1013, close
                assert 2 <= retry_after_of(close["reason"]) <= 4, close
                check_counts(gate, refused=1, held=False)  # the client closed it before exiting
            finally:
                gate.stop()

    asyncio.run(main())


# The JavaScript of docs/browser-clients.md, which the page below runs.
SNIPPET = re.search(r"```js\n(.*?)```",
                    (pathlib.Path(__file__).parents[2] / "docs" / "browser-clients.md").read_text(),
                    re.S).group(1)

# Opens a connection that holds the only slot, then one more; records what the browser reports
# of the second, and the delays the documented `reconnectDelay` derives from it and from a 1006.
PAGE = ("""<!doctype html>
<html><head><meta charset="utf-8"><title>wsgate close-mode refusal</title></head><body><script>
"use strict";
""" + SNIPPET + """
window.results = [];
const url = "ws://" + location.host + "/ws";
const held = new WebSocket(url);
held.onopen = () => {
  const r = new WebSocket(url);
  r.onopen = () => window.results.push({ name: "r", event: "open", protocol: r.protocol });
  r.onclose = (e) => window.results.push({
    name: "r", event: "close", code: e.code, reason: e.reason, clean: e.wasClean,
    delayMs: reconnectDelay(e, 0),
    backoffMs: reconnectDelay({ code: 1006, reason: "" }, 3),
  });
};
</script></body></html>""").encode()


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="chromium not installed (tests/clients/run.sh installs it)")
def test_chromium_page_reads_1013_and_the_retry_after() -> None:
    async def main() -> None:
        async with Upstream(page=PAGE) as up:
            gate = Wsgate(up.port, **ENV)
            try:
                async with devtools(f"http://{gate.proxy}/") as tools:
                    results = await tools.wait_for(lambda r: events(r, "r", "close"))
                    print(f"\nchromium page results: {results}")
                    assert events(results, "r", "open") == [
                        {"name": "r", "event": "open", "protocol": ""}], results
                    (close,) = events(results, "r", "close")
                    assert close["code"] == 1013 and close["clean"] is True, close
                    # The documented handler waits exactly the N wsgate sent, and backs off
                    # within the cap of its fourth step otherwise.
                    assert close["delayMs"] == 1000 * retry_after_of(close["reason"]), close
                    assert 2000 <= close["delayMs"] <= 4000, close
                    assert 0 <= close["backoffMs"] <= 8000, close
                    check_counts(gate, refused=1)
            finally:
                gate.stop()

    asyncio.run(main())
