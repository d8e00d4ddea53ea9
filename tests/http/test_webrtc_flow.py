"""The whole flow with real WebRTC: two aiortc peers meet through rooms, signaling and TURN.

The server is the real `p2pserver` command with its built-in TURN server; the peers take
iceServers from their welcome, force relay, and trade data-channel messages through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from typing import Any

import pytest
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)
from httpkit import TIMEOUT, Peer, StartProcess

pytestmark = pytest.mark.slow

FLOW_TIMEOUT = 90.0


def _relay_config(welcome: dict[str, Any], transport: str, port: int) -> RTCConfiguration:
    """Only the TURN URL for `transport` (aiortc uses the first TURN URL it is given)."""
    _, turn = welcome["iceServers"]
    urls = [url for url in turn["urls"] if url.endswith(f"?transport={transport}")]
    assert urls == [f"turn:127.0.0.1:{port}?transport={transport}"]
    server = RTCIceServer(urls=urls, username=turn["username"], credential=turn["credential"])
    return RTCConfiguration(iceServers=[server], iceTransportPolicy=RTCIceTransportPolicy.RELAY)


async def _next_signal(peer: Peer) -> dict[str, Any]:
    while (message := await peer.recv(FLOW_TIMEOUT))["type"] != "signal":
        pass
    return message


async def _pass_description(
    sender: Peer, pc_sender: RTCPeerConnection, receiver: Peer, pc_receiver: RTCPeerConnection
) -> RTCSessionDescription:
    """Send the sender's local description through the signaling; the receiver applies it."""
    description = pc_sender.localDescription
    data = {"type": description.type, "sdp": description.sdp}
    await sender.send({"type": "signal", "to": receiver.id, "data": data})
    received = await _next_signal(receiver)
    assert received["from"] == sender.id
    await pc_receiver.setRemoteDescription(RTCSessionDescription(**received["data"]))
    return description


def _candidate_types(sdp: str) -> set[str]:
    return set(re.findall(r"a=candidate:.* typ (\w+)", sdp))


@pytest.mark.parametrize(("transport", "workers"), [("udp", 1), ("tcp", 1), ("udp", 2), ("tcp", 2)])
async def test_two_aiortc_peers_talk_through_builtin_turn(
    start_process: StartProcess, transport: str, workers: int
) -> None:
    process, server = await start_process(
        "--turn-workers",
        str(workers),  # 2: TURN in worker processes (docs/turn.md, "Workers")
        "--turn-host",
        "127.0.0.1",
        "--turn-port",
        "0",  # a free port, bound by the server itself and named in its iceServers
        "--allow-peer",
        "127.0.0.0/8",
        "--public-host",
        "127.0.0.1",
    )
    turn_port = process.ports["udp"]
    room_id, pin = await server.create_room(withPin=True)
    alice = await server.join(room_id, pin)
    bob = await server.join(room_id, pin)
    assert bob.welcome["peers"] == [alice.id]
    assert (await alice.expect("peer-joined"))["peerId"] == bob.id

    pc_alice = RTCPeerConnection(_relay_config(alice.welcome, transport, turn_port))
    pc_bob = RTCPeerConnection(_relay_config(bob.welcome, transport, turn_port))
    loop = asyncio.get_running_loop()
    alice_got: asyncio.Future[str] = loop.create_future()
    bob_got: asyncio.Future[str] = loop.create_future()
    try:

        @pc_alice.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            @channel.on("message")
            def on_message(message: str) -> None:
                if not alice_got.done():
                    alice_got.set_result(message)
                    channel.send(f"hello bob, {alice.id} here")

        channel = pc_bob.createDataChannel("chat")
        opened: asyncio.Future[None] = loop.create_future()

        @channel.on("open")
        def on_open() -> None:
            if not opened.done():
                opened.set_result(None)

        @channel.on("message")
        def on_reply(message: str) -> None:
            if not bob_got.done():
                bob_got.set_result(message)

        # Bob, the newcomer, offers; aiortc gathers every candidate before the SDP is ready.
        await pc_bob.setLocalDescription(await pc_bob.createOffer())
        offer = await _pass_description(bob, pc_bob, alice, pc_alice)
        await pc_alice.setLocalDescription(await pc_alice.createAnswer())
        answer = await _pass_description(alice, pc_alice, bob, pc_bob)

        # Relay only: every candidate either side offered is a TURN relay on 127.0.0.1.
        for sdp in (offer.sdp, answer.sdp):
            assert _candidate_types(sdp) == {"relay"}, sdp
            assert "127.0.0.1" in sdp

        await asyncio.wait_for(opened, FLOW_TIMEOUT)
        channel.send(f"hello alice, {bob.id} here")
        assert await asyncio.wait_for(alice_got, FLOW_TIMEOUT) == f"hello alice, {bob.id} here"
        assert await asyncio.wait_for(bob_got, FLOW_TIMEOUT) == f"hello bob, {alice.id} here"

        async with server.client() as http:
            health = await http.get("/healthz")
        assert health.status_code == 200
        turn = health.json()["turn"]
        assert turn["running"] is True
        assert turn["stats"]["allocations"] >= 2
        if workers == 2:
            assert [w["alive"] for w in turn["workers"]] == [True, True], turn
    finally:
        for pc in (pc_alice, pc_bob):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pc.close(), TIMEOUT)


async def test_busy_turn_port_fails_startup(start_process: StartProcess) -> None:
    """If TURN cannot bind, the process exits non-zero (tests/cli checks its one-line error)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))  # a port this test holds, so nobody else can take it
        turn_port = busy.getsockname()[1]
        with pytest.raises(AssertionError, match=r"server exited [1-9]"):
            await start_process("--turn-host", "127.0.0.1", "--turn-port", str(turn_port))
