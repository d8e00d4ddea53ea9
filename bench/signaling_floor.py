"""The least an ASGI app on uvicorn can do per signaling peer: the floor under `connect` figures.

It answers every HTTP request (so `POST /create-chat` and `GET /healthz`) with a made-up room,
accepts every WebSocket and answers each frame with a welcome. No Starlette, no store, no hub:
what is left is uvicorn, its sans-I/O WebSocket protocol and the generator. Run it in
p2pserver's place to see how close p2pserver's peers ready/s is to what uvicorn allows:

    .venv/bin/python bench/signaling.py --runs 3 --only connect-64 \\
        --p2p-command ".venv/bin/python bench/signaling_floor.py"

It takes p2pserver's flags and uses only --http-host and --http-port (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import secrets
from typing import Any

import uvicorn

WELCOME = json.dumps({"type": "welcome", "peerId": "floor", "peers": [], "iceServers": []})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
    elif scope["type"] == "http":
        while (await receive()).get("more_body"):
            pass
        body = json.dumps({"roomId": secrets.token_urlsafe(16), "pin": None}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    else:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            await send({"type": "websocket.send", "text": WELCOME})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http-host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=3000)
    args, _ = parser.parse_known_args()  # p2pserver's other flags mean nothing here
    uvicorn.run(
        app,
        host=args.http_host,
        port=args.http_port,
        log_level="warning",
        access_log=False,
        ws="websockets-sansio",  # as p2pserver's protocol is built on
        ws_per_message_deflate=False,  # as p2pserver's default
    )


if __name__ == "__main__":
    main()
