"""Headless Chromium driven over the DevTools protocol, for the browser tests.

`Chromium` starts Debian's chromium with a DevTools endpoint on an ephemeral loopback port and
stops it (and its helper processes) by PID; `DevTools` opens a page and reads what the page
recorded in `window.results`. The protocol is itself a WebSocket, spoken with `websockets`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from websockets.asyncio.client import connect

CHROMIUM = os.environ.get("CHROMIUM_BIN") or shutil.which("chromium")


class Chromium:
    """Headless Chromium with a DevTools endpoint on an ephemeral loopback port, stopped by PID."""

    def __init__(self) -> None:
        if CHROMIUM is None:
            raise RuntimeError("chromium not found: tests/clients/run.sh installs it, "
                               "or set CHROMIUM_BIN")
        self.profile = tempfile.TemporaryDirectory(prefix="wsgate-chromium-")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--disable-extensions", "--disable-background-networking",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile.name}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, start_new_session=True,
        )
        self.endpoint = self._devtools_endpoint()
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def _devtools_endpoint(self) -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError(f"chromium exited: {self.proc.wait()}")
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                return m.group(1)
        raise RuntimeError("chromium never announced its DevTools endpoint")

    def stop(self) -> None:
        # Its helper processes (zygote, renderer) are in the session it leads: ours to stop too.
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # The browser can exit before its helpers (crashpad, a renderer) have stopped writing into
        # the profile: stop whatever is left of the session, then remove the profile, retrying
        # while a helper that was just killed may still be finishing a write (bounded: 2 s).
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for attempt in range(10):
            try:
                self.profile.cleanup()
                return
            except OSError:
                if attempt == 9:
                    raise
                time.sleep(0.2)


class DevTools:
    """A minimal DevTools-protocol client: one page, commands and the console entries it logs."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.session: str | None = None
        self.console: list[str] = []

    async def call(self, method: str, **params):
        msg_id = next(self.ids)
        msg = {"id": msg_id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        await self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + 20
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"{method}: no reply within 20 s"
            reply = json.loads(await asyncio.wait_for(self.ws.recv(), left))
            if reply.get("method") == "Log.entryAdded":
                self.console.append(reply["params"]["entry"]["text"])
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    async def open_page(self, url: str) -> None:
        target = await self.call("Target.createTarget", url="about:blank")
        attached = await self.call("Target.attachToTarget", targetId=target["targetId"],
                                   flatten=True)
        self.session = attached["sessionId"]
        await self.call("Log.enable")
        await self.call("Page.navigate", url=url)

    async def results(self) -> list[dict]:
        got = await self.call("Runtime.evaluate",
                              expression="JSON.stringify(window.results || [])",
                              returnByValue=True)
        return json.loads(got["result"].get("value") or "[]")

    async def wait_for(self, condition, timeout: float = 15) -> list[dict]:
        """Polls the page's results until `condition(results)` holds; fails with them otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            results = await self.results()
            if condition(results) or time.monotonic() > deadline:
                return results
            await asyncio.sleep(0.05)


def events(results: list[dict], name: str, event: str) -> list[dict]:
    return [r for r in results if r["name"] == name and r["event"] == event]


@contextlib.asynccontextmanager
async def devtools(url: str = "about:blank"):
    """Headless Chromium with one tab on `url`, driven through a `DevTools` session; the browser
    is stopped afterwards, whatever happened."""
    browser = Chromium()
    try:
        async with connect(browser.endpoint, max_size=None) as ws:
            tools = DevTools(ws)
            await tools.open_page(url)
            yield tools
    finally:
        browser.stop()
