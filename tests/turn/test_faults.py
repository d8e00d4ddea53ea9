"""Fault containment: a bug in any asyncio callback of the TURN layer costs one datagram or one
connection, is counted, and is logged through the rate-limited log (ERROR, the traceback the first
time of each kind, then counts), while everyone else is served. And a flood of connections that
reset straight after connecting, against the real process under uvloop, costs nothing at all."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import struct
import time
from collections.abc import Callable

import pytest
from aioice.stun import Class, Method
from processkit import ServerProcess
from stunclient import StunClient
from turnkit import PASSWORD, USER

from p2pserver.turn import server as server_module
from p2pserver.turn.allocation import Allocation
from p2pserver.turn.server import TurnServer
from serverlog import wait_until

TIMEOUT = 20.0
FAULT_LINE = re.compile(r"\((\d+) in the last \d+ s\)")


async def still_serves(server: TurnServer) -> None:
    for transport in ("udp", "tcp"):
        client = await StunClient.connect(("127.0.0.1", server.port), transport)
        try:
            answer = await client.request(Method.BINDING, sign=False)
            assert answer.message_class == Class.RESPONSE, transport
        finally:
            client.close()


def fault_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "p2pserver.turn.server" and r.levelno == logging.ERROR
    ]


def logged_count(records: list[logging.LogRecord]) -> int:
    """What the log lines say happened: the sum of their counts."""
    total = 0
    for record in records:
        match = FAULT_LINE.search(record.getMessage())
        assert match, record.getMessage()
        total += int(match[1])
    return total


async def test_fault_in_the_core_is_traced_once_then_counted(
    server: TurnServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="p2pserver")
    server.ratelog.interval = 3600.0  # one line per kind for the whole test

    def broken(*args: object, **kwargs: object) -> bytes | None:
        raise RuntimeError("injected into TurnCore.handle")

    monkeypatch.setattr(server.core, "handle", broken)
    client = await StunClient.connect(("127.0.0.1", server.port), "udp")
    for _ in range(5):
        # A Refresh request (a plain Binding is answered before TurnCore.handle, by hand).
        client.send_raw(b"\x00\x04\x00\x00\x21\x12\xa4\x42" + bytes(12))
    await wait_until(lambda: server.stats()["faults"] == 5, what="five faults")
    records = fault_records(caplog)
    assert len(records) == 1, records  # the first in full, the next four held back
    assert records[0].exc_info
    assert "injected into TurnCore.handle" in caplog.text  # the traceback, at ERROR
    monkeypatch.undo()
    await still_serves(server)
    await server.stop()  # flushes what the log held back
    records = fault_records(caplog)
    assert len(records) == 2 and not records[1].exc_info
    assert logged_count(records) == server.core.stats.faults == 5
    assert "5 faults in all" in caplog.text


async def one_relayed_datagram(server: TurnServer) -> None:
    client = await StunClient.connect(("127.0.0.1", server.port), "udp")
    await client.login(USER, PASSWORD)
    relayed = (await client.allocate()).attributes["XOR-RELAYED-ADDRESS"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.1", 0))
        permit = {"XOR-PEER-ADDRESS": peer.getsockname()}
        assert (await client.request(Method.CREATE_PERMISSION, permit)).message_class == (
            Class.RESPONSE
        )
        peer.sendto(b"to the client", relayed)
        await wait_until(lambda: server.core.stats.faults > 0, what="the relay fault")
        peer.sendto(b"and again", relayed)
        await wait_until(lambda: server.core.stats.faults > 1, what="a second relay fault")


async def one_tcp_connection(server: TurnServer) -> None:
    client = await StunClient.connect(("127.0.0.1", server.port), "tcp")
    await asyncio.wait_for(client.protocol.closed.wait(), TIMEOUT)  # type: ignore[union-attr]


async def one_tcp_allocation_closed(server: TurnServer) -> None:
    client = await StunClient.connect(("127.0.0.1", server.port), "tcp")
    await client.login(USER, PASSWORD)
    assert (await client.allocate()).message_class == Class.RESPONSE
    client.close()
    await wait_until(lambda: server.core.stats.faults > 0, what="the fault on close")


async def one_timer(server: TurnServer) -> None:
    """An Allocate leaves a cached response (RFC 8489 §6.3.4); with a short window its expiry
    is the core's next deadline, and the loop runs the timers for it."""
    server.core.responses.window = 0.05
    client = await StunClient.connect(("127.0.0.1", server.port), "udp")
    await client.login(USER, PASSWORD)
    assert (await client.allocate()).message_class == Class.RESPONSE
    await wait_until(lambda: server.core.stats.faults > 0, what="the timer to fail")


def break_attribute(target: object, name: str) -> Callable[[pytest.MonkeyPatch], None]:
    def apply(monkeypatch: pytest.MonkeyPatch) -> None:
        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError(f"injected into {name}")

        monkeypatch.setattr(target, name, broken)

    return apply


@pytest.mark.parametrize(
    ("said", "inject", "trigger"),
    [
        ("relaying a datagram", break_attribute(Allocation, "from_peer"), one_relayed_datagram),
        ("a new connection", break_attribute(server_module, "Client"), one_tcp_connection),
        (
            "closing a connection",
            break_attribute(server_module.TurnCore, "drop_client"),
            one_tcp_allocation_closed,
        ),
        ("expiry timer", break_attribute(server_module.TurnCore, "handle_timers"), one_timer),
    ],
    ids=["relay-read", "connection-made", "connection-lost", "timer"],
)
async def test_every_callback_is_contained(
    open_server: TurnServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    said: str,
    inject: Callable[[pytest.MonkeyPatch], None],
    trigger: Callable[[TurnServer], object],
) -> None:
    server = open_server  # may relay to loopback: the relay-read case needs a peer there
    caplog.set_level(logging.INFO, logger="p2pserver")
    server.ratelog.interval = 3600.0
    inject(monkeypatch)
    await trigger(server)  # type: ignore[misc]
    records = fault_records(caplog)
    assert records and records[0].exc_info, caplog.text
    assert said in records[0].getMessage() and "injected into" in caplog.text
    assert sum(1 for r in records if r.exc_info) == 1  # traced once
    monkeypatch.undo()
    await still_serves(server)
    await server.stop()
    assert logged_count(fault_records(caplog)) == server.core.stats.faults > 0


# --- the connect-then-reset flood, against the process as `make run` starts it ----------------

FLOOD = 500
FLOOD_DEADLINE = 60.0


def reset_flood(port: int) -> int:
    """FLOOD connections to 127.0.0.1:port, each closed with an RST (SO_LINGER 0) right after
    connecting, every other one after a few bytes of garbage. Bounded in count and time."""
    linger = struct.pack("ii", 1, 0)
    deadline = time.monotonic() + FLOOD_DEADLINE
    done = 0
    for i in range(FLOOD):
        if time.monotonic() > deadline:
            break
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            sock.settimeout(5)
            try:
                sock.connect(("127.0.0.1", port))
                if i % 2:
                    sock.send(b"\x7f\xff\x00\x08GET / HTTP/1.1"[: 4 + i % 12])
            except OSError:
                continue  # the backlog was full: that connection never was
        done += 1
    return done


async def test_connect_reset_flood_under_uvloop() -> None:
    server = await ServerProcess.start(
        "--no-http",
        "--turn-host",
        "127.0.0.1",
        "--turn-port",
        "0",
        "--user",
        f"{USER}:{PASSWORD}",
    )
    try:
        assert "event loop: uvloop" in server.text(), server.text()
        started = time.monotonic()
        done = await asyncio.to_thread(reset_flood, server.port)
        elapsed = time.monotonic() - started
        assert done >= FLOOD // 2, done
        for transport in ("udp", "tcp"):  # the process still answers
            client = await StunClient.connect(("127.0.0.1", server.port), transport)
            answer = await client.request(Method.BINDING, sign=False)
            assert answer.message_class == Class.RESPONSE, transport
            client.close()
    finally:
        code = await server.stop()
    log = server.text()
    assert code == 0, log
    assert "Traceback" not in log, log  # nothing reached asyncio's own exception handler
    final = re.search(r"(\d+) faults in all, (\d+) connections reset", log)
    assert final, log
    lines = log.splitlines()
    faults = [line for line in lines if " ERROR " in line]
    assert sum(int(m[1]) for line in faults if (m := FAULT_LINE.search(line))) == int(final[1])
    assert len(faults) == sum(1 for line in faults if FAULT_LINE.search(line))
    # Within the rate: per kind of warning, one line per 10 s interval (+1 at the start).
    warnings = [line for line in lines if " WARNING " in line]
    assert len(warnings) <= 2 * (int(elapsed / 10.0) + 2), warnings
