"""TURN over TLS (RFC 8656 §3.1): the same protocol on port 5349 inside a TLS stream."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from pathlib import Path

from aioice.turn import create_turn_endpoint
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from turnkit import LOOPBACK, PASSWORD, USER, ServerFactory


def self_signed(directory: Path) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(b"echo " + data, addr)


class Inbox(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(data)


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
