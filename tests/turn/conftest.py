"""Fixtures for the STUN/TURN tests: a real TurnServer on 127.0.0.1 and a raw STUN client."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from p2pserver.config import Settings
from p2pserver.turn.server import TurnServer

sys.path.insert(0, str(Path(__file__).parent))

from turnkit import LOOPBACK, PASSWORD, SECRET, USER, ServerFactory


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests marked `both_loops` run on asyncio's own loop and on uvloop, which `make run`
    installs and which differs in the corners (e.g. a peer name of None for a connection
    reset before it was accepted); the others on asyncio's loop only."""
    if item.get_closest_marker("both_loops") is None:
        return {"asyncio": asyncio.new_event_loop}
    import uvloop

    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


BASE = Settings(
    http=False,
    turn_host="127.0.0.1",
    turn_port=0,
    users=((USER, PASSWORD), ("bob", "builder")),
    secret=SECRET,
    realm="test.realm",
)


@pytest.fixture
async def make_server() -> AsyncIterator[ServerFactory]:
    """Start TurnServers with Settings overrides (and, in `worker`, TurnServer's own arguments,
    to run one as a TURN worker would); all are stopped after the test."""
    servers: list[TurnServer] = []

    async def make(worker: dict[str, Any] | None = None, **overrides: object) -> TurnServer:
        server = TurnServer(replace(BASE, **overrides), **(worker or {}))  # type: ignore[arg-type]
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


@pytest.fixture
async def server(make_server: ServerFactory) -> TurnServer:
    """The default server: loopback peers denied, as in production."""
    return await make_server()


@pytest.fixture
async def open_server(make_server: ServerFactory) -> TurnServer:
    """A server that may relay to loopback, for data-path tests on one host."""
    return await make_server(allow_peers=(LOOPBACK,))
