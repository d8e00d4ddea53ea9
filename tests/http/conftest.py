"""Real servers on 127.0.0.1 for the HTTP and signaling tests: in this loop or as processes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from httpkit import Process, Server, StartProcess, StartServer, wait_until

from p2pserver.app import create_app
from p2pserver.config import Settings
from p2pserver.serving import DrainingServer, uvicorn_config
from rediskit import redis_server as redis_server  # a fixture: a real redis-server


@pytest.fixture
async def start_server(tmp_path: Path) -> AsyncIterator[StartServer]:
    """Start uvicorn + the app in this event loop, configured as cli.serve_all does."""
    running: list[tuple[DrainingServer, asyncio.Task[None], Server]] = []

    async def start(**overrides: Any) -> Server:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        values: dict[str, Any] = {
            "http_host": "127.0.0.1",
            "http_port": port,
            "db": str(tmp_path / "rooms.db"),
            "turn": False,
        }
        values.update(overrides)
        settings = Settings(**values)
        app = create_app(settings)
        config = uvicorn_config(app, settings, log_level="warning")  # as cli.serve_all runs it
        server = DrainingServer(config, drain=app.state.hub.close_all)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        await wait_until(lambda: server.started or task.done())
        if task.done():
            task.result()
            raise RuntimeError("server did not start")
        handle = Server(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", settings, app)
        running.append((server, task, handle))
        return handle

    yield start
    for server, task, handle in reversed(running):
        await handle.close_clients()
        server.should_exit = True
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def server(start_server: StartServer) -> Server:
    return await start_server()


@pytest.fixture
async def start_process(tmp_path: Path) -> AsyncIterator[StartProcess]:
    """Start the real `p2pserver` command; extra flags are passed through."""
    started: list[tuple[Process, Server]] = []

    async def start(*flags: str, db: Path | None = None) -> Any:
        ready = tmp_path / f"ready-{len(started)}.json"
        args = [
            "--http-host",
            "127.0.0.1",
            "--http-port",
            "0",  # the server binds a free port itself and says which in --ready-file
            "--db",
            str(db or tmp_path / "rooms.db"),
            "--log-level",
            "warning",
            "--ready-file",
            str(ready),
            *flags,
        ]
        process = Process(args, tmp_path / "server.log")
        process.start()
        process.ports = await process.wait_ports(ready)
        port = process.ports["http"]
        handle = Server(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", Settings())
        started.append((process, handle))
        await process.wait_ready(handle.http_url)
        return process, handle

    yield start
    for process, handle in started:
        await handle.close_clients()
        process.kill()
