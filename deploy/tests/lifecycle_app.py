"""The app container of test_pod_lifecycle.py: a WebSocket echo server that, like many real apps,
drops every session the moment it gets SIGTERM (Close 1012 "app stopping", then exit 0).

    python lifecycle_app.py PORT

A client that sees 1012 was cut by the app, not drained by wsgate (which sends close_code_drain).
"""

import asyncio
import signal
import sys

from websockets.asyncio.server import serve

APP_STOPPING = 1012


async def main(port: int) -> None:
    sessions = set()

    async def echo(ws) -> None:
        sessions.add(ws)
        try:
            async for message in ws:
                await ws.send(message)
        finally:
            sessions.discard(ws)

    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with serve(echo, "127.0.0.1", port):
        print(f"app listening on 127.0.0.1:{port}", flush=True)
        await stop
        print(f"app got SIGTERM with {len(sessions)} sessions open: closing them", flush=True)
        await asyncio.gather(*(ws.close(APP_STOPPING, "app stopping") for ws in list(sessions)),
                             return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
