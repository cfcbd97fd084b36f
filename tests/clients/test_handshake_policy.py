"""The handshake policy of docs/security.md#handshake-policy, seen by Python `websockets` (the Node
`ws` side is in test_node_policy.py).

Each test starts the real binary with the policy's WSGATE_* variables (or a TOML file for the JWT
rule), connects with `websockets` as a user would, and checks what each end saw: the HTTP status
the client got (101, or the refusal in `InvalidStatus`), the subprotocol it was given, the
handshakes the upstream received and the `Sec-WebSocket-Protocol` they carried, and the metric.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import pathlib
import re
import time
from contextlib import asynccontextmanager

from harness import Upstream, Wsgate, eventually
from websockets.asyncio.client import connect
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "jwt"
BEARER = "base64url.bearer.authorization.k8s.io."
ORIGIN_REFUSALS = 'wsgate_connections_rejected_total{reason="origin"}'
SUBPROTOCOL_REFUSALS = 'wsgate_connections_rejected_total{reason="subprotocol"}'
JWT_REFUSALS = 'wsgate_connections_rejected_total{reason="jwt"}'
KEY_REFUSALS = 'wsgate_connections_rejected_total{reason="key"}'
BAD_SUBPROTOCOL = 'wsgate_upstream_errors_total{kind="bad_subprotocol"}'
ACTIVE = "wsgate_connections_active"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_token(sub: str, secret: bytes | None = None) -> str:
    """A JWT for `sub`, valid for 10 minutes, signed HS256 with the `hs-1` key of
    tests/fixtures/jwt (the characters of hs256.secret), or with `secret` to forge one."""
    key = (FIXTURES / "hs256.secret").read_bytes() if secret is None else secret
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "hs-1"}).encode())
    claims = b64url(json.dumps({"sub": sub, "exp": int(time.time()) + 600}).encode())
    signed = f"{header}.{claims}"
    signature = hmac.new(key, signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{b64url(signature)}"


def jwt_config(directory: pathlib.Path) -> dict[str, str]:
    """A TOML file in `directory` reading the JWT from the subprotocol and allowing one connection
    per `sub` (rule `user`); returns the WSGATE_CONFIG variable naming it."""
    file = directory / "wsgate.toml"
    file.write_text(
        f"jwt_jwks_file = {json.dumps(str(FIXTURES / 'jwks.json'))}\n"
        'jwt_from = "subprotocol"\n'
        "[[key_limits]]\n"
        'name = "user"\n'
        'key = "jwt_claim:sub"\n'
        "max_per_key = 1\n")
    return {"WSGATE_CONFIG": str(file)}


class SelectingUpstream:
    """A raw TCP upstream that answers any request with a correct 101 whose
    `Sec-WebSocket-Protocol` is `selected`, whatever it was offered; it then waits for the other
    end to close. Records each request head and counts the connections closed on it."""

    GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, selected: str = "evil") -> None:
        self.selected = selected
        self.requests: list[bytes] = []
        self.closed = 0
        self.server = None
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head)
            key = re.search(rb"(?im)^sec-websocket-key:[ \t]*(\S+)", head).group(1)
            accept = base64.b64encode(hashlib.sha1(key + self.GUID).digest())
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept +
                         b"\r\nSec-WebSocket-Protocol: " + self.selected.encode() + b"\r\n\r\n")
            await writer.drain()
            await reader.read()  # until wsgate closes this connection
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        self.closed += 1
        writer.close()

    async def __aenter__(self) -> "SelectingUpstream":
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()


@asynccontextmanager
async def gate_in_front(up, **env: str):
    """wsgate in front of the started upstream `up`, with the WSGATE_* variables of `env`."""
    gate = Wsgate(up.port, **env)
    try:
        yield gate
    finally:
        gate.stop()


async def attempt(url: str, **kw) -> tuple[int, str | None]:
    """Opens a WebSocket with `websockets` (`kw` for connect()): (101, the subprotocol it was given)
    after a text message went through the upstream and back, or (the status, None) of a refusal."""
    try:
        async with connect(url, open_timeout=5, close_timeout=5, **kw) as ws:
            await ws.send("through")
            assert await asyncio.wait_for(ws.recv(), 5) == "through"
            return 101, ws.subprotocol
    except InvalidStatus as refused:
        return refused.response.status_code, None


async def assert_metric_becomes(gate: Wsgate, series: str, value: float) -> None:
    await eventually(lambda: gate.metric(series) == value, 5)
    assert gate.metric(series) == value, f"{series} = {gate.metric(series)}, not {value}"


async def run_cases(gate: Wsgate, up: Upstream, cases) -> None:
    """Each case (connect() kwargs, wanted status, what): the status the client saw, and the
    upstream received a handshake exactly when it was admitted."""
    seen = []
    for kw, want, what in cases:
        before = len(up.requests)
        status, _ = await attempt(gate.url, **kw)
        seen.append((what, status, len(up.requests) - before))
    wanted = [(what, want, 1 if want == 101 else 0) for _, want, what in cases]
    assert seen == wanted, "(case, status, handshakes the upstream received)"


def origin(value: str) -> dict:
    return {"origin": value}


def test_origins_are_compared_normalised_and_refusals_reach_nothing() -> None:
    cases = [
        ({}, 101, "no Origin: not a browser, allowed"),
        (origin("https://app.example.com"), 101, "exact"),
        (origin("HTTPS://APP.EXAMPLE.COM"), 101, "case"),
        (origin("https://app.example.com:443"), 101, "the default port"),
        (origin("https://a.example.org"), 101, "wildcard, depth 1"),
        (origin("https://a.b.example.org"), 101, "wildcard, depth 2"),
        (origin("https://example.org"), 403, "the apex of a wildcard"),
        (origin("http://localhost:8080"), 101, "the listed port"),
        (origin("http://localhost:8081"), 403, "another port"),
        (origin("https://app.example.com:8443"), 403, "a port the entry does not have"),
        (origin("http://app.example.com"), 403, "another scheme"),
        (origin("null"), 403, "opaque, not listed"),
        (origin("https://app.example.com.evil.example"), 403, "a suffix trick"),
        ({"additional_headers": Headers([("Origin", "https://app.example.com"),
                                         ("Origin", "https://evil.example")])},
         403, "two Origin headers"),
    ]

    async def main() -> None:
        async with Upstream() as up, gate_in_front(
                up, WSGATE_ALLOWED_ORIGINS="https://app.example.com,https://*.example.org,"
                                           "http://localhost:8080") as gate:
            await run_cases(gate, up, cases)
            refused = sum(1 for _, want, _ in cases if want == 403)
            await assert_metric_becomes(gate, ORIGIN_REFUSALS, refused)
            assert all(h.get("Origin") != "https://evil.example" for h in up.requests)
            await assert_metric_becomes(gate, ACTIVE, 0)

    asyncio.run(main())


def test_null_listed_and_require_origin() -> None:
    async def main() -> None:
        async with Upstream() as up:
            async with gate_in_front(up, WSGATE_ALLOWED_ORIGINS="null",
                                     WSGATE_REQUIRE_ORIGIN="true") as gate:
                await run_cases(gate, up, [
                    (origin("null"), 101, "null, listed"),
                    ({}, 403, "no Origin, required"),
                    (origin("https://app.example.com"), 403, "not listed"),
                ])
                await assert_metric_becomes(gate, ORIGIN_REFUSALS, 2)
            async with gate_in_front(up, WSGATE_REQUIRE_ORIGIN="true") as gate:
                await run_cases(gate, up, [
                    ({}, 403, "require_origin alone: one must be sent"),
                    (origin("https://anything.example"), 101, "require_origin alone: any origin"),
                    (origin("null"), 101, "require_origin alone: null too"),
                ])
                await assert_metric_becomes(gate, ORIGIN_REFUSALS, 1)
            assert len(up.requests) == 3

    asyncio.run(main())


def test_offered_subprotocols_outside_the_list_never_reach_the_upstream() -> None:
    async def main() -> None:
        # The upstream prefers "evil": it can select it only if wsgate lets it through.
        async with Upstream(subprotocols=["evil", "superchat", "chat"]) as up, gate_in_front(
                up, WSGATE_SUBPROTOCOLS="chat,superchat") as gate:
            assert await attempt(gate.url, subprotocols=["evil", "chat", "x", "superchat"]) == \
                (101, "superchat")
            assert up.requests[0].get_all("Sec-WebSocket-Protocol") == ["chat, superchat"]
            assert await attempt(gate.url, subprotocols=["chat"]) == (101, "chat")
            assert up.requests[1].get_all("Sec-WebSocket-Protocol") == ["chat"]
            # Nothing listed offered, not required: forwarded without a subprotocol.
            assert await attempt(gate.url, subprotocols=["evil"]) == (101, None)
            assert up.requests[2].get_all("Sec-WebSocket-Protocol") == []
            assert up.selected == ["superchat", "chat", None]
            assert gate.metric(SUBPROTOCOL_REFUSALS) == 0

    asyncio.run(main())


def test_require_subprotocol_and_a_malformed_offer_get_400() -> None:
    async def main() -> None:
        async with Upstream(subprotocols=["chat"]) as up, gate_in_front(
                up, WSGATE_SUBPROTOCOLS="chat", WSGATE_REQUIRE_SUBPROTOCOL="true") as gate:
            await run_cases(gate, up, [
                ({"subprotocols": ["chat"]}, 101, "listed"),
                ({"subprotocols": ["other", "chat"]}, 101, "listed, among others"),
                ({"subprotocols": ["other"]}, 400, "none listed"),
                ({}, 400, "none offered"),
                ({"additional_headers": {"Sec-WebSocket-Protocol": "chat, not a token"}},
                 400, "an entry that is not a token"),
            ])
            assert [h.get_all("Sec-WebSocket-Protocol") for h in up.requests] == \
                [["chat"], ["chat"]]
            await assert_metric_becomes(gate, SUBPROTOCOL_REFUSALS, 3)

    asyncio.run(main())


def test_an_upstream_selecting_an_unoffered_subprotocol_is_502() -> None:
    async def main() -> None:
        async with SelectingUpstream("evil") as up, gate_in_front(up) as gate:
            assert gate.metric(BAD_SUBPROTOCOL) == 0
            assert await attempt(gate.url, subprotocols=["chat"]) == (502, None)
            assert await attempt(gate.url) == (502, None), "a selection when none was offered"
            assert len(up.requests) == 2, "both reached the upstream, which answered 101"
            assert b"sec-websocket-protocol: chat" in up.requests[0].lower()
            await assert_metric_becomes(gate, BAD_SUBPROTOCOL, 2)
            await eventually(lambda: up.closed == 2, 5)
            assert up.closed == 2, "wsgate closed both upstream connections"
            await assert_metric_becomes(gate, ACTIVE, 0)

    asyncio.run(main())


def test_a_jwt_in_the_subprotocol_is_verified_counted_and_stripped(tmp_path) -> None:
    alice = hs256_token("alice")
    offer = ["chat", BEARER + alice]

    async def main() -> None:
        async with Upstream(subprotocols=["chat"]) as up, gate_in_front(
                up, **jwt_config(tmp_path)) as gate:
            async with connect(gate.url, subprotocols=offer, open_timeout=5) as ws:
                assert ws.subprotocol == "chat"
                await ws.send("as alice")
                assert await asyncio.wait_for(ws.recv(), 5) == "as alice"
                assert up.requests[0].get_all("Sec-WebSocket-Protocol") == ["chat"]
                assert all(alice not in v and alice.split(".")[2] not in v
                           for v in up.requests[0].values()), "the token never reaches it"
                assert await attempt(gate.url, subprotocols=offer) == (429, None), \
                    "counted under alice's sub (limit 1)"
                await assert_metric_becomes(gate, KEY_REFUSALS, 1)
                forged = hs256_token("bob", secret=b"not the secret")
                assert await attempt(gate.url, subprotocols=["chat", BEARER + forged]) == \
                    (401, None), "a wrong signature"
                await assert_metric_becomes(gate, JWT_REFUSALS, 1)
                assert await attempt(gate.url, subprotocols=[BEARER + hs256_token("carol")]) == \
                    (400, None), "nothing besides the token to select"
                await assert_metric_becomes(gate, SUBPROTOCOL_REFUSALS, 1)
                assert len(up.requests) == 1, "no refusal reached the upstream"
            await assert_metric_becomes(gate, ACTIVE, 0)
            assert await attempt(gate.url, subprotocols=offer) == (101, "chat"), \
                "alice's slot is back"
            assert up.selected == ["chat", "chat"]

    asyncio.run(main())
