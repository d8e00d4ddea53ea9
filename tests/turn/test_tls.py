"""TURN over TLS (RFC 8656 §3.1): the same protocol on port 5349 inside a TLS stream."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from aioice.turn import create_turn_endpoint
from turnkit import LOOPBACK, PASSWORD, USER, ServerFactory

from peers import Echo, Inbox
from tlskit import self_signed


async def test_relay_over_tls(make_server: ServerFactory, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server = await make_server(tls_cert=cert, tls_key=key, tls_port=0, allow_peers=(LOOPBACK,))
    tls_port = next(port for name, _, port in server.addresses if name == "tls")
    loop = asyncio.get_running_loop()
    echo_transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    echo = echo_transport.get_extra_info("sockname")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    transport, inbox = await create_turn_endpoint(
        Inbox,
        server_addr=("127.0.0.1", tls_port),
        username=USER,
        password=PASSWORD,
        transport="tcp",
        ssl=context,
    )
    try:
        assert server.stats()["allocations"] == 1
        assert any(c.name == "tls" for c in server.connections)
        for payload in (b"a", b"over tls", bytes(999)):
            transport.sendto(payload, echo)
            assert await asyncio.wait_for(inbox.queue.get(), 10) == b"echo " + payload
    finally:
        transport.close()
        echo_transport.close()
