"""Helpers for the HTTP and signaling tests: clients, servers and the `p2pserver` process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from p2pserver.config import Settings
from serverlog import TIMEOUT, Process, wait_until


class Peer:
    """A signaling client: JSON in and out, with timeouts on every wait."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.id = ""  # set by Server.join
        self.welcome: dict[str, Any] = {}

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def expect(self, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        message = await self.recv(timeout)
        assert message["type"] == kind, message
        return message

    async def expect_error(self, code: str) -> dict[str, Any]:
        message = await self.expect("error")
        assert message["code"] == code, message
        assert isinstance(message["message"], str)
        return message

    async def closed(self, timeout: float = TIMEOUT) -> int | None:
        """Wait for the server to close the socket (reading what is left); return the code."""
        with contextlib.suppress(ConnectionClosed):
            async with asyncio.timeout(timeout):
                while True:
                    await self.ws.recv()
        await asyncio.wait_for(self.ws.wait_closed(), timeout)
        return self.ws.close_code

    async def alive(self) -> None:
        """Assert the socket still works: a ping is answered (skipping earlier messages)."""
        await self.send({"type": "ping"})
        async with asyncio.timeout(TIMEOUT):
            while (await self.recv())["type"] != "pong":
                pass


@dataclass
class Server:
    http_url: str
    ws_url: str
    settings: Settings
    app: Any = None
    clients: list[ClientConnection] = field(default_factory=list)

    def client(self, **headers: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.http_url, timeout=TIMEOUT, headers=headers)

    async def create_room(self, **body: Any) -> tuple[str, str | None]:
        async with self.client() as http:
            response = await http.post("/create-chat", json=body)
        assert response.status_code == 200, response.text
        data = response.json()
        return data["roomId"], data["pin"]

    async def connect(self, room_id: str, *, host: str | None = None, **headers: str) -> Peer:
        """Open /ws/{room_id}; `host` puts another Host header on a connection to 127.0.0.1."""
        url, sock = f"{self.ws_url}/ws/{room_id}", None
        if host is not None:
            _, port = self.ws_url.rsplit(":", 1)
            sock = socket.create_connection(("127.0.0.1", int(port)))
            url = f"ws://{host}/ws/{room_id}"
        ws = await connect(
            url,
            sock=sock,
            additional_headers=headers or None,
            open_timeout=TIMEOUT,
            max_size=None,
            proxy=None,
        )
        self.clients.append(ws)
        return Peer(ws)

    async def join(
        self, room_id: str, pin: str | None = None, *, host: str | None = None, **headers: str
    ) -> Peer:
        peer = await self.connect(room_id, host=host, **headers)
        await peer.send({"type": "join"} if pin is None else {"type": "join", "pin": pin})
        peer.welcome = await peer.expect("welcome")
        peer.id = peer.welcome["peerId"]
        return peer

    async def close_clients(self) -> None:
        for ws in self.clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5)


StartServer = Callable[..., Awaitable[Server]]
StartProcess = Callable[..., Awaitable[tuple[Process, Server]]]


def rooms_on_disk(path: Any) -> set[str]:
    """The room ids committed to a SQLite file, as another process reads them."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as db:
        return {row[0] for row in db.execute("SELECT id FROM rooms")}


async def wait_on_disk(path: Any, *room_ids: str) -> None:
    """Until the rooms are committed: with --db-sync normal create-chat answers before that
    (docs/api.md#rooms), milliseconds before."""
    await wait_until(lambda: set(room_ids) <= rooms_on_disk(path), what=f"{room_ids} on disk")
