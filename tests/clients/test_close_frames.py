"""wsgate ends connections in WebSocket terms (docs/behaviour.md#close-frames), seen by Python `websockets`.

Each test starts the real binary in front of a `websockets` echo server (both on 127.0.0.1,
port 0), connects with `websockets` as a user would, and checks what the client library reports
when wsgate ends the connection: the close code and reason, a clean closing handshake, and that
every message sent before the Close arrived byte-identical, with permessage-deflate negotiated
end to end through wsgate.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import pytest
from harness import Upstream, Wsgate, eventually
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

LOG = logging.getLogger("client")


async def talk_until_closed(ws, n: int = 100_000) -> tuple[list[str], list[str]]:
    """Sends numbered, compressible messages while reading echoes, until the connection closes."""
    sent: list[str] = []
    echoed: list[str] = []

    async def reader() -> None:
        try:
            async for msg in ws:
                echoed.append(msg)
        except ConnectionClosed:
            pass

    task = asyncio.create_task(reader())
    try:
        for i in range(n):
            msg = f"message {i} " + "abc" * (i % 200)
            await ws.send(msg)
            sent.append(msg)
            await asyncio.sleep(0.002)
    except ConnectionClosed:
        pass
    await asyncio.wait_for(task, 10)
    return sent, echoed


def check_intact(sent: list[str], got: list) -> None:
    assert got == sent[: len(got)], "messages before the Close must arrive complete and in order"


@pytest.mark.parametrize(
    ("env", "code", "reason"),
    [
        ({"WSGATE_MAX_CONNECTION_LIFETIME": "1s", "WSGATE_LIFETIME_JITTER": "0",
          "WSGATE_CLOSE_CODE_LIFETIME": "1012"}, 1012, "lifetime"),
        ({"WSGATE_IDLE_TIMEOUT": "500ms", "WSGATE_CLOSE_CODE_IDLE": "4000"}, 4000, "idle"),
    ],
    ids=["lifetime", "idle"],
)
def test_websockets_client_sees_the_configured_code(env, code, reason) -> None:
    async def main() -> None:
        async with Upstream() as up:
            gate = Wsgate(up.port, **env)
            try:
                async with connect(gate.url, compression="deflate") as ws:
                    assert "permessage-deflate" in str(ws.response.headers.get("Sec-WebSocket-Extensions")), \
                        "permessage-deflate negotiated end to end through wsgate"
                    if reason == "idle":
                        await ws.send("one message, then silence")
                        assert await ws.recv() == "one message, then silence"
                        with pytest.raises(ConnectionClosed) as closed:
                            await asyncio.wait_for(ws.recv(), 10)
                        exc = closed.value
                        sent, echoed = ["one message, then silence"], ["one message, then silence"]
                    else:
                        sent, echoed = await talk_until_closed(ws)
                        exc = None
                    await asyncio.wait_for(ws.wait_closed(), 10)
                    LOG.warning("client log: %s", exc or f"closed {ws.close_code} {ws.close_reason}")
                    assert ws.close_code == code
                    assert reason in ws.close_reason
                    # A clean closing handshake: the client received a Close and its reply went out.
                    assert ws.protocol.close_rcvd is not None and ws.protocol.close_sent is not None
                    check_intact(sent, echoed)
                await eventually(lambda: up.closes, 5)
                assert up.closes and up.closes[0][0] == code, f"upstream saw {up.closes}"
                check_intact(sent, up.received)
                assert len(echoed) > 0
            finally:
                gate.stop()

    asyncio.run(main())


def test_websockets_client_drained_on_sigterm_receives_1001() -> None:
    async def main() -> None:
        async with Upstream() as up:
            gate = Wsgate(up.port, WSGATE_DRAIN_PERIOD="1s", WSGATE_SHUTDOWN_GRACE="5s")
            try:
                async with connect(gate.url, compression="deflate") as ws:
                    await ws.send("before the drain")
                    assert await ws.recv() == "before the drain"
                    started = time.monotonic()
                    gate.proc.send_signal(signal.SIGTERM)
                    with pytest.raises(ConnectionClosed) as closed:
                        await asyncio.wait_for(ws.recv(), 10)
                    print(f"\nclient log (websockets {__import__('websockets').__version__}): "
                          f"{closed.value!r} after {time.monotonic() - started:.2f}s")
                    assert ws.close_code == 1001
                    assert "draining" in ws.close_reason
                    assert ws.protocol.close_rcvd is not None and ws.protocol.close_sent is not None
                assert await gate.exit_code() == 0, "wsgate exits 0 after the drain"
                await eventually(lambda: up.closes, 5)
                assert up.closes and up.closes[0][0] == 1001, f"upstream saw {up.closes}"
            finally:
                gate.stop()

    asyncio.run(main())
