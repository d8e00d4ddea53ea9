"""Plain UDP peers for relay tests (tests/ is on pytest's pythonpath): one that echoes, one that
keeps what arrives."""

from __future__ import annotations

import asyncio


class Echo(asyncio.DatagramProtocol):
    """Answers every datagram with b"echo " + it, to where it came from."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(b"echo " + data, addr)


class Inbox(asyncio.DatagramProtocol):
    """Keeps every datagram's payload in `queue`."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(data)
