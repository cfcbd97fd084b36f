"""`wsgate demo`'s page in a real browser: headless Chromium, driven as a newcomer would.

The page comes through wsgate from the demo's built-in upstream; pressing "open one more" three
times must show 2 admitted and 1 refused (the demo's cap is 2), each admitted socket must show
its message echoed, and after "close one" the next socket must get in. This is what the README
and the banner promise a person who opens the page. Chromium is driven over the DevTools
protocol with test_browser.py's helpers.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest
from harness import WSGATE_BIN, eventually, read_until
from browser import CHROMIUM, Chromium, DevTools
from websockets.asyncio.client import connect


class Demo:
    """`wsgate demo` on port 0, its addresses read from the banner it prints; stopped by PID."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WSGATE_")}
        env.update(WSGATE_LISTEN="127.0.0.1:0", WSGATE_ADMIN_LISTEN="127.0.0.1:0", RUST_LOG="info")
        self.proc = subprocess.Popen(
            [WSGATE_BIN, "demo"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        self.log: list[str] = []
        # Keep reading the log, so a full pipe can never block wsgate's logging.
        threading.Thread(target=self._drain_log, daemon=True).start()
        self.banner: list[str] = []
        self.proxy = self._banner_addr(r"proxy\s+ws://([0-9.:]+)/")
        self.page = self._banner_addr(r"open (http://[0-9.:]+/) in a browser")

    def _drain_log(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    def _banner_addr(self, pattern: str) -> str:
        return read_until(self.proc, self.proc.stdout, pattern, self.banner)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


async def page_state(tools: DevTools) -> dict:
    """The counts and socket rows as the page shows them (empty before it has loaded)."""
    got = await tools.call("Runtime.evaluate", returnByValue=True, expression="""JSON.stringify(
        document.getElementById("open-one") === null ? {} : {
          admitted: document.getElementById("admitted").textContent,
          open: document.getElementById("open").textContent,
          refused: document.getElementById("refused").textContent,
          rows: [...document.querySelectorAll("#sockets li")].map((li) => li.textContent),
        })""")
    return json.loads(got["result"].get("value") or "{}")


async def wait_state(tools: DevTools, condition, timeout: float = 15) -> dict:
    """Polls the page until `condition(state)` holds; returns the last state either way."""
    deadline = time.monotonic() + timeout
    while True:
        state = await page_state(tools)
        if (state and condition(state)) or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.05)


async def click(tools: DevTools, button: str) -> None:
    await tools.call("Runtime.evaluate", expression=f'document.getElementById("{button}").click()')


def echoed(state: dict) -> list[str]:
    return [row for row in state.get("rows", []) if "echoed" in row]


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="chromium not installed (tests/clients/run.sh installs it)")
def test_demo_page_shows_two_admitted_and_one_refused() -> None:
    async def main() -> None:
        demo = Demo()
        browser = Chromium()
        try:
            async with connect(browser.endpoint, max_size=None) as ws:
                tools = DevTools(ws)
                await tools.open_page(demo.page)
                loaded = await wait_state(tools, lambda s: True)
                assert loaded == {"admitted": "0", "open": "0", "refused": "0", "rows": []}, loaded

                for _ in range(3):
                    await click(tools, "open-one")
                state = await wait_state(
                    tools, lambda s: s["refused"] == "1" and len(echoed(s)) == 2)
                print(f"\ndemo page after three opens: {state}")
                assert (state["admitted"], state["open"], state["refused"]) == ("2", "2", "1")
                assert sum("refused (over the cap)" in r for r in state["rows"]) == 1, state
                for row in echoed(state):
                    n = re.search(r"socket (\d+)", row).group(1)
                    assert f'echoed "hello from socket {n}"' in row, row

                # "close one" frees a slot in wsgate: the next socket is admitted.
                await click(tools, "close-one")
                state = await wait_state(tools, lambda s: any("closed" in r for r in s["rows"]))
                assert state["open"] == "1", state
                await click(tools, "open-one")
                state = await wait_state(tools, lambda s: s["admitted"] == "3")
                print(f"after close one, open one more: {state}")
                assert (state["admitted"], state["open"], state["refused"]) == ("3", "2", "1")

            browser.stop()  # its sockets end with it, so the shutdown below is immediate
            demo.proc.send_signal(signal.SIGTERM)
            await eventually(lambda: demo.proc.poll() is not None, 10)
            assert demo.proc.poll() == 0, demo.log
        finally:
            browser.stop()
            demo.stop()

    asyncio.run(main())
