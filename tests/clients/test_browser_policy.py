"""The handshake policy and the refusals a browser can read, seen by headless Chromium.

The same page (`policy.html`) is served from two origins, two loopback HTTP servers on ports of
their own, and opens WebSockets to wsgate from there:

- Cross-Site WebSocket Hijacking: from the allowed origin the page's WebSocket opens and echoes;
  from the other origin it is refused (403 `origin`) and the upstream sees nothing of it.
- A JWT in the subprotocol: Chromium offers `["chat", "base64url.bearer.authorization.k8s.io.<jwt>"]`;
  it is admitted and counted under the token's `sub`, and the upstream saw only `chat`.
- `refusal_mode = "close"`: over the cap, the page's close event carries code 1013 and the reason
  `retry after N s`, which a page can act on (a 503 reaches it as 1006).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import pathlib
import re
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from browser import CHROMIUM, DevTools, devtools, events
from harness import Wsgate
from websockets.asyncio.server import serve

HERE = pathlib.Path(__file__).parent
PAGE = (HERE / "policy.html").read_bytes()
FIXTURES = HERE.parent / "fixtures" / "jwt"
PREFIX = "base64url.bearer.authorization.k8s.io."

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="chromium not installed (tests/clients/run.sh installs it)")


class PageServer:
    """Serves `policy.html` at every path from 127.0.0.1 on a port of its own: one origin."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(PAGE)))
                self.end_headers()
                self.wfile.write(PAGE)

            def log_message(self, *_args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ChatUpstream:
    """A `websockets` echo server that selects `chat` and records each handshake's headers."""

    def __init__(self) -> None:
        self.handshakes: list[dict[str, str]] = []
        self.server = None
        self.port = 0

    def process_request(self, _connection, request):
        self.handshakes.append({k.lower(): v for k, v in request.headers.raw_items()})
        return None

    async def handler(self, ws) -> None:
        async for msg in ws:
            await ws.send(msg)

    async def __aenter__(self) -> "ChatUpstream":
        self.server = await serve(self.handler, "127.0.0.1", 0, subprotocols=["chat"],
                                  process_request=self.process_request)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()


def hs256(claims: dict) -> str:
    """A JWT signed with the test HMAC key of tests/fixtures/jwt (kid `hs-1`)."""
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "hs-1"}).encode())
    body = b64(json.dumps(claims).encode())
    secret = (FIXTURES / "hs256.secret").read_bytes()
    sig = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(sig)}"


async def open_page(tools: DevTools, url: str) -> None:
    """Navigates to `url` and waits until the page's `openWs` is defined."""
    await tools.call("Page.navigate", url=url)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        got = await tools.call("Runtime.evaluate", expression="typeof window.openWs",
                               returnByValue=True)
        if got["result"].get("value") == "function":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never loaded")


async def open_ws(tools: DevTools, name: str, url: str, protocols: list[str] | None) -> None:
    await tools.call("Runtime.evaluate",
                     expression=f"openWs({json.dumps(name)}, {json.dumps(url)}, "
                                f"{json.dumps(protocols)})")


@contextlib.asynccontextmanager
async def chromium_through_wsgate(**gate_env: str):
    """The chat upstream, wsgate in front of it with `gate_env`, and Chromium with a DevTools
    session on a blank tab (the test navigates it); everything stopped by PID afterwards."""
    async with ChatUpstream() as up:
        gate = Wsgate(up.port, **gate_env)
        try:
            async with devtools() as tools:
                yield up, gate, tools
        finally:
            gate.stop()


@needs_chromium
def test_chromium_a_foreign_origin_is_refused_and_reaches_nothing() -> None:
    async def main() -> None:
        allowed, foreign = PageServer(), PageServer()
        try:
            async with chromium_through_wsgate(WSGATE_ALLOWED_ORIGINS=allowed.origin) as (up, gate, tools):
                url = f"ws://{gate.proxy}/ws"
                await open_page(tools, allowed.origin + "/")
                await open_ws(tools, "app", url, ["chat"])
                results = await tools.wait_for(lambda r: events(r, "app", "text"))
                print(f"\nfrom {allowed.origin}: {results}")
                assert events(results, "app", "open") == [
                    {"name": "app", "event": "open", "protocol": "chat"}]
                assert events(results, "app", "text")[0]["data"] == f"hello from {allowed.origin}"
                assert [h.get("origin") for h in up.handshakes] == [allowed.origin]

                await open_page(tools, foreign.origin + "/")
                await open_ws(tools, "attacker", url, ["chat"])
                results = await tools.wait_for(lambda r: events(r, "attacker", "close"))
                await tools.results()  # collects the console lines logged meanwhile
                print(f"from {foreign.origin}: {results}; console: {tools.console}")
                assert not events(results, "attacker", "open"), results
                assert events(results, "attacker", "close")[0]["code"] == 1006
                assert any("403" in line for line in tools.console), tools.console
                assert len(up.handshakes) == 1, "the refused upgrade never reached the upstream"
                assert gate.metric('wsgate_connections_rejected_total{reason="origin"}') == 1
        finally:
            allowed.stop()
            foreign.stop()

    asyncio.run(main())


@needs_chromium
def test_chromium_jwt_in_the_subprotocol_is_counted_and_stripped() -> None:
    async def main() -> None:
        page = PageServer()
        config = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
        config.write(f'jwt_jwks_file = "{FIXTURES / "jwks.json"}"\n'
                     'jwt_from = "subprotocol"\n'
                     '[[key_limits]]\nname = "user"\nkey = "jwt_claim:sub"\nmax_per_key = 1\n')
        config.close()
        token = hs256({"sub": "alice", "exp": int(time.time()) + 600})
        try:
            async with chromium_through_wsgate(WSGATE_CONFIG=config.name) as (up, gate, tools):
                url = f"ws://{gate.proxy}/ws"
                await open_page(tools, page.origin + "/")
                await open_ws(tools, "alice", url, ["chat", PREFIX + token])
                results = await tools.wait_for(lambda r: events(r, "alice", "text"))
                print(f"\nchromium: {results}")
                assert events(results, "alice", "open")[0]["protocol"] == "chat"
                assert len(up.handshakes) == 1
                assert up.handshakes[0].get("sec-websocket-protocol") == "chat", up.handshakes
                assert not any(token in v for v in up.handshakes[0].values()), \
                    "the token never reaches the upstream"
                assert gate.metric('wsgate_keys_tracked{rule="user"}') == 1

                await open_ws(tools, "alice2", url, ["chat", PREFIX + token])
                results = await tools.wait_for(lambda r: events(r, "alice2", "close"))
                assert not events(results, "alice2", "open"), "alice holds her limit of 1"
                assert gate.metric('wsgate_connections_rejected_total{reason="key"}') == 1
                assert len(up.handshakes) == 1
                assert token not in "".join(gate.log), "the token is never logged"
        finally:
            page.stop()
            os.unlink(config.name)

    asyncio.run(main())


@needs_chromium
def test_chromium_reads_a_close_mode_refusal_as_1013_with_its_retry() -> None:
    async def main() -> None:
        page = PageServer()
        try:
            async with chromium_through_wsgate(WSGATE_MAX_CLIENTS="1", WSGATE_REFUSAL_MODE="close",
                                               WSGATE_RETRY_AFTER="3s") as (up, gate, tools):
                url = f"ws://{gate.proxy}/ws"
                await open_page(tools, page.origin + "/")
                await open_ws(tools, "first", url, ["chat"])
                await tools.wait_for(lambda r: events(r, "first", "text"))
                await open_ws(tools, "second", url, ["chat"])
                results = await tools.wait_for(lambda r: events(r, "second", "close"))
                print(f"\nchromium: {results}")
                closed = events(results, "second", "close")[0]
                assert closed["code"] == 1013, closed
                m = re.fullmatch(r"retry after (\d+) s", closed["reason"])
                assert m, closed
                assert 3 <= int(m.group(1)) <= 6, closed
                assert closed["clean"] is True, closed
                assert len(up.handshakes) == 1, "a close-mode refusal never reaches the upstream"
                assert gate.metric('wsgate_connections_rejected_total{reason="capacity"}') == 1
                assert gate.metric("wsgate_connections_active") == 1
        finally:
            page.stop()

    asyncio.run(main())
