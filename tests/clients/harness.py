"""What the client tests share: a real upstream, the wsgate binary, and polling with a deadline.

The upstream is a `websockets` echo server (it can also serve one HTML page, for the browser);
wsgate is the binary started the way a user starts it, on 127.0.0.1 port 0, stopped by PID.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import threading
import time
import urllib.request

from websockets.asyncio.server import serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response

def _default_wsgate_bin() -> str:
    """debug/wsgate in the cargo target directory: CARGO_TARGET_DIR when set (a shared build cache),
    else the workspace's target/, as `cargo metadata` reports it."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        meta = subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps",
                               "--manifest-path", os.path.join(root, "Cargo.toml")],
                              capture_output=True, text=True, timeout=60, check=True)
        target = json.loads(meta.stdout)["target_directory"]
    except (OSError, subprocess.SubprocessError, ValueError, KeyError):
        target = os.path.join(root, "target")
    return os.path.join(target, "debug", "wsgate")


WSGATE_BIN = os.environ.get("WSGATE_BIN") or _default_wsgate_bin()


def read_until(proc: subprocess.Popen, stream, pattern: str, seen: list[str]) -> str:
    """Reads `stream` of `proc` line by line (each kept in `seen`) until `pattern` matches, within
    10 s; returns the pattern's first group. The process exiting first is an error, with what it said."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            raise RuntimeError(f"wsgate exited: {proc.wait()}; it printed: {seen}")
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m.group(1)
    raise RuntimeError(f"wsgate never printed {pattern!r}: {seen}")


class Upstream:
    """A `websockets` echo server that records what it received and how it was closed.

    With `page`, a plain GET of `/` is answered with that HTML instead of a handshake, so a
    browser can load it through wsgate's plain-HTTP path and open its WebSockets from there.

    `requests` holds the headers of every handshake request that reached it (so a test can see
    that a refused upgrade never did, and what `Sec-WebSocket-Protocol` it was offered). With
    `subprotocols`, it selects the first of them that was offered (none when none was, instead of
    websockets' 400); `selected` holds what it selected on each connection it served.
    """

    def __init__(self, page: bytes | None = None, max_size: int | None = 2**20,
                 subprotocols: list[str] | None = None) -> None:
        self.received: list[str | bytes] = []
        self.arrivals: list[float] = []  # time.monotonic() of each message in `received`
        self.max_size = max_size  # the largest message it accepts (websockets' default: 1 MiB)
        self.closes: list[tuple[int | None, str | None]] = []
        self.page = page
        self.subprotocols = subprotocols
        self.requests: list[Headers] = []
        self.selected: list[str | None] = []
        self.server = None
        self.port = 0

    async def handler(self, ws) -> None:
        self.selected.append(ws.subprotocol)
        try:
            async for msg in ws:
                self.arrivals.append(time.monotonic())
                self.received.append(msg)
                try:
                    await ws.send(msg)
                except ConnectionClosed:
                    pass  # a Close came in: still record the messages that arrived before it
        except ConnectionClosed:
            pass
        self.closes.append((ws.close_code, ws.close_reason))

    def process_request(self, _connection, request):
        if self.page is None or request.path != "/":
            self.requests.append(request.headers)
            return None  # a WebSocket handshake
        headers = Headers({"Content-Type": "text/html; charset=utf-8",
                           "Content-Length": str(len(self.page))})
        return Response(200, "OK", headers, self.page)

    def select_subprotocol(self, _connection, offered):
        return next((p for p in self.subprotocols or [] if p in offered), None)

    async def __aenter__(self) -> "Upstream":
        extra = {}
        if self.subprotocols:
            extra = {"subprotocols": self.subprotocols,
                     "select_subprotocol": self.select_subprotocol}
        self.server = await serve(self.handler, "127.0.0.1", 0, compression="deflate",
                                  process_request=self.process_request, max_size=self.max_size,
                                  **extra)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()


class Wsgate:
    """The wsgate binary, started as a user starts it, stopped by PID."""

    def __init__(self, upstream_port: int, **env: str) -> None:
        full = {k: v for k, v in os.environ.items() if not k.startswith("WSGATE_")}
        full.update(
            WSGATE_UPSTREAM=f"127.0.0.1:{upstream_port}",
            WSGATE_LISTEN="127.0.0.1:0",
            WSGATE_ADMIN_LISTEN="127.0.0.1:0",
            RUST_LOG="info",
            **env,
        )
        self.proc = subprocess.Popen(
            [WSGATE_BIN], env=full, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )
        self.log: list[str] = []
        self.proxy = self._wait_for("proxy")
        self.admin = self._wait_for("admin")
        # Keep reading the log, so a full pipe can never block wsgate's logging.
        threading.Thread(target=self._drain_log, daemon=True).start()

    def _wait_for(self, what: str) -> str:
        return read_until(self.proc, self.proc.stderr, rf"{what} listening addr=(\S+)", self.log)

    def _drain_log(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    @property
    def url(self) -> str:
        return f"ws://{self.proxy}/"

    def metric(self, series: str) -> float:
        """The value of one series on the admin port, e.g. `wsgate_connections_active` or
        `wsgate_message_guard_total{guard="size",action="close"}` (labels in any order)."""
        with urllib.request.urlopen(f"http://{self.admin}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                name, _, value = line.rpartition(" ")
                if series_key(name) == series_key(series):
                    return float(value)
        raise AssertionError(f"{series} missing from /metrics")

    async def exit_code(self, timeout: float = 10) -> int | None:
        """Waits for the process to exit without blocking the event loop.

        A blocking `proc.wait()` would freeze the in-process upstream too, so it could neither
        answer wsgate's Close nor record it before the assertions run.
        """
        await eventually(lambda: self.proc.poll() is not None, timeout)
        return self.proc.poll()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def series_key(series: str) -> tuple[str, frozenset[tuple[str, str]]]:
    """A series' name and its set of labels, so the labels' order does not matter."""
    name, _, labels = series.partition("{")
    return name, frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels))


async def eventually(condition, timeout: float) -> None:
    """Polls `condition` every 10 ms, yielding to the event loop, until it holds or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
