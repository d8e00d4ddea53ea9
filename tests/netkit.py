"""Free ports on 127.0.0.1, for the few tests that must name a port to another program before
it binds (podman's published ports). A p2pserver the tests start binds port 0 itself and
reports what it got (--ready-file), which no other test can take meanwhile."""

from __future__ import annotations

import contextlib
import socket


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_turn_port() -> int:
    """A port free for both UDP and TCP (TURN listens on both)."""
    for _ in range(50):
        port = free_port(socket.SOCK_DGRAM)
        with contextlib.suppress(OSError), socket.socket() as tcp:
            tcp.bind(("127.0.0.1", port))
            return port
    raise RuntimeError("no port free for both UDP and TCP")
