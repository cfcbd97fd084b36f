"""wsgate seen by a real browser: headless Chromium from Debian.

Chromium loads `page.html` through wsgate's plain-HTTP path, and the page opens WebSockets back
through wsgate: a text and a 64 KiB binary message must echo intact, the third connection over a
cap of 2 must be refused (the browser's console names the 503), and on SIGTERM the browser must
see a clean close with 1001 and wsgate's reason. The test drives Chromium over the DevTools
protocol (itself a WebSocket, spoken here with the `websockets` library).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal

import pytest
from browser import CHROMIUM, devtools, events
from harness import Upstream, Wsgate, eventually

PAGE = (pathlib.Path(__file__).parent / "page.html").read_bytes()


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="chromium not installed (tests/clients/run.sh installs it)")
def test_chromium_through_wsgate_echo_cap_and_drain() -> None:
    async def main() -> None:
        async with Upstream(page=PAGE) as up:
            gate = Wsgate(up.port, WSGATE_MAX_CLIENTS="2", WSGATE_DRAIN_PERIOD="500ms",
                          WSGATE_SHUTDOWN_GRACE="5s")
            try:
                async with devtools(f"http://{gate.proxy}/") as tools:

                    results = await tools.wait_for(lambda r: events(r, "c", "close"))
                    print(f"\nchromium ({CHROMIUM}) page results: {results}")
                    assert events(results, "a", "text") == [
                        {"name": "a", "event": "text", "data": "hello from chromium"}]
                    assert events(results, "a", "binary") == [
                        {"name": "a", "event": "binary", "length": 65536, "intact": True}]
                    assert events(results, "b", "open"), "the second connection fits the cap"
                    assert not events(results, "c", "open"), "the third is over the cap of 2"
                    assert events(results, "c", "close")[0]["code"] == 1006
                    # The browser's console names the status it got.
                    await tools.results()  # collects console entries logged meanwhile
                    print(f"chromium console: {tools.console}")
                    assert any("503" in line for line in tools.console), tools.console
                    assert gate.metric('wsgate_connections_rejected_total{reason="capacity"}') == 1
                    assert gate.metric("wsgate_connections_active") == 2

                    gate.proc.send_signal(signal.SIGTERM)
                    results = await tools.wait_for(
                        lambda r: events(r, "a", "close") and events(r, "b", "close"))
                    print(f"after SIGTERM: {results}")
                    for name in ("a", "b"):
                        closed = events(results, name, "close")
                        assert closed, f"{name} not closed: {results}"
                        assert closed[0]["code"] == 1001, closed
                        assert "draining" in closed[0]["reason"], closed
                        assert closed[0]["clean"] is True, closed
                assert await gate.exit_code() == 0, "wsgate exits 0 after the drain"
                await eventually(lambda: len(up.closes) >= 2, 5)
                assert sorted(code for code, _ in up.closes) == [1001, 1001], up.closes
            finally:
                gate.stop()

    asyncio.run(main())
