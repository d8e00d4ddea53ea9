"""Signaling across instances sharing one Redis (a real redis-server): peers of one room on
different instances see each other and their signals arrive, in order; room limits hold
across instances; a killed instance's peers are reported left; real WebRTC across two."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import pytest
from aiortc import RTCDataChannel, RTCPeerConnection
from httpkit import TIMEOUT, Peer, Server, StartProcess, StartServer
from test_webrtc_flow import FLOW_TIMEOUT, _candidate_types, _pass_description, _relay_config

from rediskit import RedisServer


async def _fleet(
    start: StartServer, redis: RedisServer, count: int, **options: object
) -> list[Server]:
    return [await start(redis=redis.url, **options) for _ in range(count)]


async def _signals(sender: Peer, receiver: Peer, count: int) -> None:
    """`count` numbered signals from sender to receiver arrive, all and in order."""
    for i in range(count):
        await sender.send({"type": "signal", "to": receiver.id, "data": {"n": i}})
    for i in range(count):
        message = await receiver.expect("signal")
        assert message == {"type": "signal", "from": sender.id, "data": {"n": i}}


async def test_two_instances_one_room(start_server: StartServer, redis_server: RedisServer) -> None:
    a, b = await _fleet(start_server, redis_server, 2)
    room_id, _ = await a.create_room()
    alice = await a.join(room_id)
    bob = await b.join(room_id)
    assert alice.welcome["peers"] == [] and bob.welcome["peers"] == [alice.id]
    assert (await alice.expect("peer-joined"))["peerId"] == bob.id
    await _signals(alice, bob, 50)
    await _signals(bob, alice, 50)
    # A signal in another spelling is re-encoded, and arrives the same.
    await bob.ws.send(f'{{ "data": [1, "x"], "to": "{alice.id}", "type": "signal" }}')
    assert await alice.expect("signal") == {"type": "signal", "from": bob.id, "data": [1, "x"]}
    await bob.send({"type": "signal", "to": "NoSuchPeer000", "data": 1})
    await bob.expect_error("unknown-peer")
    await bob.ws.close()
    assert (await alice.expect("peer-left"))["peerId"] == bob.id
    await alice.send({"type": "signal", "to": bob.id, "data": 1})
    await alice.expect_error("unknown-peer")


async def test_three_instances_everyone_sees_everyone(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    servers = await _fleet(start_server, redis_server, 3)
    room_id, _ = await servers[0].create_room(maxPeers=4)
    peers: list[Peer] = []
    for server in servers:
        peer = await server.join(room_id)
        assert peer.welcome["peers"] == [p.id for p in peers]
        for earlier in peers:
            assert (await earlier.expect("peer-joined"))["peerId"] == peer.id
        peers.append(peer)
    fourth = await servers[1].join(room_id)  # a second peer on one instance
    for earlier in peers:
        assert (await earlier.expect("peer-joined"))["peerId"] == fourth.id
    peers.append(fourth)
    for sender in peers:
        for receiver in peers:
            if sender is not receiver:
                await _signals(sender, receiver, 3)
    fifth = await servers[2].connect(room_id)
    await fifth.send({"type": "join"})
    await fifth.expect_error("room-full")
    await peers[0].ws.close()
    for other in peers[1:]:
        assert (await other.expect("peer-left"))["peerId"] == peers[0].id


async def test_room_full_race_across_instances(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    servers = await _fleet(start_server, redis_server, 3)
    for max_peers in (2, 3):
        room_id, _ = await servers[0].create_room(maxPeers=max_peers)
        joiners = [await servers[i % 3].connect(room_id) for i in range(9)]
        await asyncio.gather(*(peer.send({"type": "join"}) for peer in joiners))
        replies = await asyncio.gather(*(peer.recv() for peer in joiners))
        welcomed = [r for r in replies if r["type"] == "welcome"]
        full = [r for r in replies if r.get("code") == "room-full"]
        assert len(welcomed) == max_peers and len(full) == 9 - max_peers, replies


async def test_killed_instance_peers_are_reported_left(
    start_process: StartProcess, redis_server: RedisServer
) -> None:
    flags = ("--no-turn", "--redis", redis_server.url, "--redis-presence-ttl", "2")
    _, a = await start_process(*flags)
    doomed, b = await start_process(*flags)
    room_id, _ = await a.create_room(maxPeers=3)
    alice = await a.join(room_id)
    bob = await b.join(room_id)
    carol = await b.join(room_id)
    assert carol.welcome["peers"] == [alice.id, bob.id]
    for _ in range(2):
        await alice.expect("peer-joined")
    doomed.signal(signal.SIGKILL)  # no goodbye
    left = {(await alice.expect("peer-left", timeout=60))["peerId"] for _ in range(2)}
    assert left == {bob.id, carol.id}
    # Their places are free again.
    dave = await a.join(room_id)
    assert dave.welcome["peers"] == [alice.id]


async def test_instance_that_stops_says_goodbye(
    start_process: StartProcess, redis_server: RedisServer
) -> None:
    flags = ("--no-turn", "--redis", redis_server.url)  # presence 10 s: goodbye, not the reaper
    _, a = await start_process(*flags)
    leaving, b = await start_process(*flags)
    room_id, _ = await a.create_room()
    alice = await a.join(room_id)
    bob = await b.join(room_id)
    await alice.expect("peer-joined")
    leaving.signal(signal.SIGTERM)
    assert (await alice.expect("peer-left"))["peerId"] == bob.id
    assert await leaving.wait() == 0


@pytest.mark.slow
async def test_aiortc_peers_on_two_instances_talk_through_relays(
    start_process: StartProcess, redis_server: RedisServer
) -> None:
    flags = ("--redis", redis_server.url, "--turn-host", "127.0.0.1", "--turn-port", "0")
    flags += ("--allow-peer", "127.0.0.0/8", "--public-host", "127.0.0.1")
    process_a, a = await start_process(*flags)
    process_b, b = await start_process(*flags)
    room_id, pin = await a.create_room(withPin=True)
    alice = await a.join(room_id, pin)
    bob = await b.join(room_id, pin)
    assert (await alice.expect("peer-joined"))["peerId"] == bob.id
    # Each peer uses its own instance's TURN server; credentials are signed with the fleet's
    # one secret, and the relays forward to each other.
    pc_alice = RTCPeerConnection(_relay_config(alice.welcome, "udp", process_a.ports["udp"]))
    pc_bob = RTCPeerConnection(_relay_config(bob.welcome, "udp", process_b.ports["udp"]))
    loop = asyncio.get_running_loop()
    got: asyncio.Future[str] = loop.create_future()
    try:

        @pc_alice.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            @channel.on("message")
            def on_message(message: str) -> None:
                if not got.done():
                    got.set_result(message)

        channel = pc_bob.createDataChannel("chat")
        opened: asyncio.Future[None] = loop.create_future()
        channel.on("open", lambda: opened.done() or opened.set_result(None))
        await pc_bob.setLocalDescription(await pc_bob.createOffer())
        offer = await _pass_description(bob, pc_bob, alice, pc_alice)
        await pc_alice.setLocalDescription(await pc_alice.createAnswer())
        answer = await _pass_description(alice, pc_alice, bob, pc_bob)
        assert _candidate_types(offer.sdp) == _candidate_types(answer.sdp) == {"relay"}
        await asyncio.wait_for(opened, FLOW_TIMEOUT)
        channel.send("across instances")
        assert await asyncio.wait_for(got, FLOW_TIMEOUT) == "across instances"
    finally:
        for pc in (pc_alice, pc_bob):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pc.close(), TIMEOUT)
