"""What an operator ships and does: JSON logs line by line, a TLS certificate swapped on SIGHUP."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
from pathlib import Path

import httpx
import websockets
from aioice.turn import create_turn_endpoint

from peers import Echo, Inbox
from serverlog import TIMEOUT, run_server
from tlskit import self_signed


async def test_json_logs_parse_line_by_line_with_room_ids_redacted(tmp_path: Path) -> None:
    server = run_server(
        [
            "--log-format", "json",
            "--http-host", "127.0.0.1", "--http-port", "0",
            "--turn-host", "127.0.0.1", "--turn-port", "0",
            "--db", str(tmp_path / "rooms.db"),
        ],
        tmp_path / "server.log",
    )  # fmt: skip
    try:
        port = (await server.wait_for(r"Uvicorn running on http://127\.0\.0\.1:(\d+)"))[1]
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as http:
            room = (await http.post("/create-chat", json={"withPin": False})).json()["roomId"]
            assert (await http.get(f"/check-chat/{room}")).status_code == 200
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/{room}") as ws:
            await ws.send(json.dumps({"type": "join"}))
            assert json.loads(await ws.recv())["type"] == "welcome"
        await server.wait_for(r"/ws/<room>")  # uvicorn's line for the WebSocket, redacted
    finally:
        assert server.stop() == 0
    lines = server.log().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= set(entry) for entry in entries)
    loggers = {entry["logger"] for entry in entries}
    assert "p2pserver.turn.server" in loggers and "uvicorn.error" in loggers  # both sides
    assert room not in server.log()


async def test_sighup_swaps_the_tls_certificate_and_open_allocations_keep_relaying(
    tmp_path: Path,
) -> None:
    cert, key = self_signed(tmp_path)
    first = Path(cert).read_bytes()
    server = run_server(
        [
            "--no-http", "--turn-host", "127.0.0.1", "--turn-port", "0", "--tls-port", "0",
            "--tls-cert", cert, "--tls-key", key,
            "--user", "alice:secret", "--realm", "test.realm", "--allow-peer", "127.0.0.0/8",
        ],
        tmp_path / "server.log",
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    echo, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    relay = None
    try:
        tls_port = int((await server.wait_for(r"listening on tls 127\.0\.0\.1:(\d+)"))[1])
        assert await served_certificate(tls_port) == pem_to_der(first)
        relay, inbox = await create_turn_endpoint(
            Inbox,
            server_addr=("127.0.0.1", tls_port),
            username="alice",
            password="secret",
            transport="tcp",
            ssl=insecure_context(),
        )
        peer = echo.get_extra_info("sockname")
        relay.sendto(b"before", peer)
        assert await asyncio.wait_for(inbox.queue.get(), TIMEOUT) == b"echo before"

        self_signed(tmp_path)  # a new key and certificate over the same files
        second = Path(cert).read_bytes()
        server.proc.send_signal(signal.SIGHUP)
        await server.wait_for(r"TLS certificate reloaded")
        assert await served_certificate(tls_port) == pem_to_der(second)
        relay.sendto(b"after", peer)  # the allocation made before the swap still relays
        assert await asyncio.wait_for(inbox.queue.get(), TIMEOUT) == b"echo after"

        Path(key).write_text("not a key")  # a broken pair is refused, the old one stays
        server.proc.send_signal(signal.SIGHUP)
        await server.wait_for(r"TLS certificate not reloaded")
        assert await served_certificate(tls_port) == pem_to_der(second)
    finally:
        if relay is not None:
            relay.close()
        echo.close()
        assert server.stop() == 0


def insecure_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def pem_to_der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


async def served_certificate(port: int) -> bytes:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=insecure_context())
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    assert der is not None
    return bytes(der)
