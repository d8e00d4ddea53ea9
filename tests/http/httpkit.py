"""Helpers for the HTTP and signaling tests: clients, servers and the `p2pserver` process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from p2pserver.config import Settings

TIMEOUT = 20.0  # generous: the CI machine is small and noisy


async def wait_until(predicate: Callable[[], Any], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not await _call(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.05)


async def _call(predicate: Callable[[], Any]) -> Any:
    result = predicate()
    return await result if isinstance(result, Awaitable) else result


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


class Process:
    """`python -m p2pserver` as a child process, with its output kept in a file."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}  # what it bound, by "http", "udp", "tcp", "tls"

    def start(self) -> None:
        log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env = {k: v for k, v in env.items() if not k.startswith("P2P_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "p2pserver", *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_ports(self, ready_file: Path) -> dict[str, int]:
        """The ports the server got: it binds port 0 itself and writes them to --ready-file."""

        def written() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
            return ready_file.exists()

        await wait_until(written, 60)
        ports: dict[str, int] = json.loads(ready_file.read_text())
        return ports

    async def wait_ready(self, http_url: str) -> None:
        async def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
            try:
                async with httpx.AsyncClient(timeout=2) as http:
                    return (await http.get(f"{http_url}/healthz")).status_code == 200
            except httpx.HTTPError:
                return False

        await wait_until(ready, 60)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not exit:\n{self.log()}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)


StartServer = Callable[..., Awaitable[Server]]
StartProcess = Callable[..., Awaitable[tuple[Process, Server]]]
