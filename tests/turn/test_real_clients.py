"""Interop with real TURN clients: aioice's TURN client, two aiortc peer connections, and coturn's
turnutils_uclient against the server run as a process.

Everything talks to 127.0.0.1 only. Waits are wait-for-condition with generous deadlines: the
machine is small and noisy, and nothing here measures speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aioice import stun
from aioice.turn import create_turn_endpoint
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
)
from processkit import ServerProcess

from p2pserver.credentials import rest_password
from p2pserver.turn.server import TurnServer
from realtools import need_program
from serverlog import wait_until
from tlskit import self_signed

pytestmark = pytest.mark.slow

# The same accounts as conftest.py's BASE settings.
USER, PASSWORD = "alice", "wonderland"
USER2, PASSWORD2 = "bob", "builder"
SECRET = "test-shared-secret"
REALM = "test.realm"
LOCALHOST = "127.0.0.1"

TIMEOUT = 20.0  # per step; generous because a 2-core CI box can stall for seconds
UCLIENT_TIMEOUT = 120.0

# Odd sizes make TCP pad ChannelData (RFC 8656 §12.5) in both directions.
PAYLOAD_SIZES = (1, 2, 3, 5, 7, 100, 333, 1199, 1200)


def payload(size: int, seed: int) -> bytes:
    """Distinct, non-constant bytes, so a truncated or shifted datagram cannot compare equal."""
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(size))


class Collector(asyncio.DatagramProtocol):
    """Queues every datagram with its source; records errors and the end of the transport."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.errors: list[Exception] = []
        self.closed = asyncio.Event()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr[:2]))

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    async def get(self) -> tuple[bytes, tuple[str, int]]:
        return await asyncio.wait_for(self.queue.get(), TIMEOUT)


def rest_credentials(expires_in: int) -> tuple[str, str]:
    username = f"{int(time.time()) + expires_in}:somebody"
    return username, rest_password(SECRET, username)


# --- 1. aioice's TURN client -----------------------------------------------------------------


@pytest.mark.parametrize("credentials", ["static", "rest"])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_aioice_relays_both_ways(
    open_server: TurnServer, transport: str, credentials: str
) -> None:
    username, password = (USER, PASSWORD) if credentials == "static" else rest_credentials(3600)
    loop = asyncio.get_running_loop()
    peer_transport, peer = await loop.create_datagram_endpoint(Collector, local_addr=(LOCALHOST, 0))
    peer_addr = peer_transport.get_extra_info("sockname")[:2]
    turn, client = await asyncio.wait_for(
        create_turn_endpoint(
            Collector,
            server_addr=(LOCALHOST, open_server.port),
            username=username,
            password=password,
            transport=transport,
        ),
        TIMEOUT,
    )
    try:
        relayed = turn.get_extra_info("sockname")
        assert relayed[0] == LOCALHOST
        assert [a.username for a in open_server.core.table] == [username]

        # One datagram at a time: the first send binds a channel, and lock-step keeps UDP order
        # out of the question.
        for seed, size in enumerate(PAYLOAD_SIZES):
            out = payload(size, seed)
            turn.sendto(out, peer_addr)
            data, source = await peer.get()
            assert (data, source) == (out, relayed), f"client->peer, {size} bytes"

            back = payload(size, seed + 100)
            peer_transport.sendto(back, relayed)
            data, source = await client.get()
            assert (data, source) == (back, peer_addr), f"peer->client, {size} bytes"

        assert client.errors == [] and peer.errors == []
        assert open_server.stats()["faults"] == 0
    finally:
        turn.close()
        peer_transport.close()
    # aioice deletes the allocation (Refresh LIFETIME 0, or the TCP connection closing).
    await asyncio.wait_for(client.closed.wait(), TIMEOUT)
    await wait_until(lambda: open_server.stats()["allocations"] == 0, what="the allocation to go")


@pytest.mark.parametrize(
    "credentials",
    [
        pytest.param(lambda: rest_credentials(-60), id="rest-expired"),
        pytest.param(lambda: (rest_credentials(3600)[0], "bm90IGl0"), id="rest-bad-signature"),
        pytest.param(lambda: (USER, "not-the-password"), id="static-wrong-password"),
    ],
)
async def test_aioice_refused_credentials(
    open_server: TurnServer, credentials: Callable[[], tuple[str, str]]
) -> None:
    username, password = credentials()
    with pytest.raises(stun.TransactionFailed) as failure:
        await asyncio.wait_for(
            create_turn_endpoint(
                Collector,
                server_addr=(LOCALHOST, open_server.port),
                username=username,
                password=password,
                transport="udp",
            ),
            TIMEOUT,
        )
    assert failure.value.response.attributes["ERROR-CODE"][0] == 401
    assert open_server.stats()["allocations"] == 0


# --- 2. two aiortc peer connections through the relay ----------------------------------------


def ice_config(port: int, transport: str, username: str, password: str) -> RTCConfiguration:
    server = RTCIceServer(
        urls=f"turn:{LOCALHOST}:{port}?transport={transport}",
        username=username,
        credential=password,
    )
    # aiortc maps the policy through a dict keyed by the enum: the string "relay" would KeyError.
    return RTCConfiguration(iceServers=[server], iceTransportPolicy=RTCIceTransportPolicy.RELAY)


def sdp_candidates(sdp: str) -> list[str]:
    return [line for line in sdp.splitlines() if line.startswith("a=candidate:")]


def nominated_types(pc: RTCPeerConnection) -> list[tuple[str, str]] | None:
    """(local, remote) candidate types of the nominated pairs. aiortc has no public API for
    the selected pair, so this peeks at aioice's Connection and gives None if that moved."""
    sctp = pc.sctp
    gatherer = sctp.transport.transport.iceGatherer if sctp is not None else None
    nominated = getattr(getattr(gatherer, "_connection", None), "_nominated", None)
    if not isinstance(nominated, dict):
        return None
    return [(p.local_candidate.type, p.remote_candidate.type) for p in nominated.values()]


@pytest.fixture
async def peer_connections() -> AsyncIterator[list[RTCPeerConnection]]:
    """Closes what a test left open. After a failed ICE negotiation aiortc's close() can wait
    on STUN retransmissions; the test has already said what went wrong, so do not pile on."""
    pcs: list[RTCPeerConnection] = []
    yield pcs
    for pc in pcs:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pc.close(), 5)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_aiortc_data_channel_over_relay(
    open_server: TurnServer, peer_connections: list[RTCPeerConnection], transport: str
) -> None:
    port = open_server.port
    a = RTCPeerConnection(ice_config(port, transport, USER, PASSWORD))
    b = RTCPeerConnection(ice_config(port, transport, USER2, PASSWORD2))
    peer_connections += [a, b]

    received_a: list[str | bytes] = []
    received_b: list[str | bytes] = []
    channel_b: list[RTCDataChannel] = []

    channel_a = a.createDataChannel("chat")
    channel_a.on("message", received_a.append)

    @b.on("datachannel")
    def on_datachannel(channel: RTCDataChannel) -> None:
        channel.on("message", received_b.append)
        channel_b.append(channel)

    # aiortc does not trickle: the description is complete once gathering is.
    await a.setLocalDescription(await a.createOffer())
    await wait_until(lambda: a.iceGatheringState == "complete", what="offerer gathering")
    offer = a.localDescription
    await b.setRemoteDescription(offer)
    await b.setLocalDescription(await b.createAnswer())
    await wait_until(lambda: b.iceGatheringState == "complete", what="answerer gathering")
    answer = b.localDescription
    await a.setRemoteDescription(answer)

    for name, sdp in (("offer", offer.sdp), ("answer", answer.sdp)):
        candidates = sdp_candidates(sdp)
        assert candidates, f"no candidates in the {name}"
        assert all(" typ relay" in line for line in candidates), candidates
        assert all(f" {LOCALHOST} " in line for line in candidates), candidates

    await wait_until(
        lambda: a.connectionState == "connected" and b.connectionState == "connected",
        what="both peer connections to connect",
    )
    await wait_until(
        lambda: (
            channel_a.readyState == "open" and bool(channel_b) and channel_b[0].readyState == "open"
        ),
        what="the data channel to open",
    )
    assert open_server.stats()["allocations"] >= 2
    for pc in (a, b):
        types = nominated_types(pc)
        if types is not None:
            assert types and all(t == ("relay", "relay") for t in types), types

    # Strings, bytes, and one message big enough for SCTP to split over several datagrams.
    to_b: list[str | bytes] = [f"hello b #{i}" for i in range(5)] + [b"\x00\xff" * 4000]
    to_a: list[str | bytes] = [f"hello a #{i}" for i in range(5)] + [os.urandom(9001)]
    for message in to_b:
        channel_a.send(message)
    for message in to_a:
        channel_b[0].send(message)
    await wait_until(
        lambda: len(received_b) >= len(to_b) and len(received_a) >= len(to_a),
        what="messages both ways",
    )
    assert received_b == to_b
    assert received_a == to_a
    # The bytes went through this server's relays, not some other path.
    assert open_server.stats()["peer_sentb"] > 9001 + 8000
    assert open_server.stats()["faults"] == 0

    # Closing deletes both allocations (Refresh LIFETIME 0 over UDP, the connection over TCP).
    for pc in (a, b):
        await asyncio.wait_for(pc.close(), TIMEOUT)
    await wait_until(lambda: open_server.stats()["allocations"] == 0, what="the allocations to go")


# --- 3. coturn's turnutils_uclient against `p2pserver` as a process ---------------------------

LOST = re.compile(
    rb"Total lost packets (\d+) \(([\d.]+)%\), total send dropped (\d+) \(([\d.]+)%\)"
)
CHANNEL_BOUND = re.compile(rb"cb response received: \s*\n[^\n]*success: 0x([0-9a-f]{4})")
TOTALS = re.compile(rb"start_mclient: tot_send_msgs=(\d+), tot_recv_msgs=(\d+)")


async def start_server_process(
    *extra: str, transports: tuple[str, ...] = ("udp", "tcp")
) -> ServerProcess:
    return await ServerProcess.start(
        "--no-http",
        "--turn-host",
        LOCALHOST,
        "--turn-port",
        "0",  # the OS picks a free UDP port, TCP takes the same one, the log says which
        "--user",
        f"{USER}:{PASSWORD}",
        "--secret",
        SECRET,
        "--realm",
        REALM,
        "--allow-peer",
        "127.0.0.0/8",
        *extra,
        transports=transports,
    )


@pytest.fixture
async def server_process() -> AsyncIterator[ServerProcess]:
    """A fresh `p2pserver` per test: uclient's allocations count against alice's quota."""
    server = await start_server_process()
    try:
        yield server
    finally:
        await server.stop()


async def run_uclient(args: list[str]) -> tuple[int, bytes]:
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), UCLIENT_TIMEOUT)
    except TimeoutError:
        process.kill()
        output, _ = await process.communicate()
        text = output.decode(errors="replace")
        raise AssertionError(f"turnutils_uclient timed out:\n{text}") from None
    assert process.returncode is not None
    return process.returncode, output


def uclient_command(port: int, *flags: str, rest: bool = False) -> list[str]:
    uclient = need_program("turnutils_uclient", "apt-get install coturn; .ci/run does")
    # -y: two clients relay to each other's relayed address (client-to-client), so no
    #     turnutils_peer is needed; -m 2 such pairs, -n 20 messages of -l 121 bytes (odd: the
    #     TCP path pads). uclient has no realm flag: it takes the realm from the 401.
    # Without -s uclient binds channels with random numbers from all of 0x4000-0x7FFF
    # (RFC 5766), which the server accepts (docs/turn.md); -s uses Send/Data indications.
    # -W: TURN REST API credentials made from the secret (the name gets an expiry prefix).
    secret = ["-W", SECRET] if rest else ["-w", PASSWORD]
    command = [uclient, *flags, "-u", USER, *secret, "-y", "-m", "2", "-n", "20", "-l", "121"]
    return [*command, "-e", LOCALHOST, "-p", str(port), LOCALHOST]


def check_uclient_run(code: int, output: bytes, server: ServerProcess) -> None:
    text = output.decode(errors="replace")
    assert code == 0, text
    lost = LOST.findall(output)
    totals = TOTALS.findall(output)
    assert lost and totals, f"no summary in uclient output:\n{text}"
    lost_packets, _, send_dropped, _ = lost[-1]
    sent, received = (int(n) for n in totals[-1])
    assert (int(lost_packets), int(send_dropped)) == (0, 0), text
    # uclient runs 4 sessions here (2 clients, RTP and RTCP each) of 20 messages.
    assert sent == received == 80, text
    assert b" error " not in output, text
    assert "ERROR" not in server.text(), server.text()


@pytest.mark.parametrize("credentials", ["static", "rest"])
@pytest.mark.parametrize("mode", ["channels", "send"])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_coturn_uclient_client_to_client(
    server_process: ServerProcess, transport: str, mode: str, credentials: str
) -> None:
    # -v in channel mode: uclient then prints each ChannelBind answer with its number.
    flags = (["-t"] if transport == "tcp" else []) + (["-s"] if mode == "send" else ["-v"])
    command = uclient_command(server_process.port, *flags, rest=credentials == "rest")
    code, output = await run_uclient(command)
    check_uclient_run(code, output, server_process)
    if mode == "channels":
        bound = [int(n, 16) for n in CHANNEL_BOUND.findall(output)]
        # 2 clients x (RTP, RTCP) sessions, each binding its peer's relayed address.
        assert len(bound) >= 4 and output.count(b"channel bind sent") == len(bound), output
        assert all(0x4000 <= n <= 0x7FFF for n in bound), bound


async def test_coturn_uclient_over_tls(tmp_path: Path) -> None:
    """TURN over TLS (RFC 8656 §3.1) with a client that is not aioice: uclient -t -S, channels."""
    cert, key = self_signed(tmp_path)
    server = await start_server_process(
        "--tls-cert", cert, "--tls-key", key, "--tls-port", "0", transports=("udp", "tcp", "tls")
    )
    try:
        command = uclient_command(server.ports["tls"], "-t", "-S", "-v")
        code, output = await run_uclient(command)
        check_uclient_run(code, output, server)
        assert len(CHANNEL_BOUND.findall(output)) >= 4, output
    finally:
        await server.stop()
