"""Constants and types the TURN tests share (a module of its own: every test folder has a
conftest.py, and `from conftest import` would pick whichever was imported last)."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable

from p2pserver.turn.server import TurnServer

USER, PASSWORD = "alice", "wonderland"
SECRET = "test-shared-secret"
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")

ServerFactory = Callable[..., Awaitable[TurnServer]]
