"""Resume (docs/api.md): a peer whose connection drops keeps its id and its place, and gets
what was sent to it meanwhile, when it rejoins with its token; on one instance and across
instances sharing a real redis-server."""

from __future__ import annotations

from typing import Any

from httpkit import Peer, Server, StartServer, wait_until

from rediskit import RedisServer


async def _drop(peer: Peer, *servers: Server) -> None:
    """The connection dies without a close frame (a phone leaving Wi-Fi, say); wait until the
    server holding it has seen that (what was written to the dead socket before is lost)."""
    peer.ws.transport.abort()

    def held() -> bool:
        return any(
            conn.held and conn.peer_id == peer.id
            for server in servers
            for conn in server.app.state.hub.tokens.values()
        )

    await wait_until(held)


async def _resume(server: Server, room_id: str, token: str) -> Peer:
    peer = await server.connect(room_id)
    await peer.send({"type": "join", "resume": token})
    peer.welcome = await peer.expect("welcome")
    peer.id = peer.welcome["peerId"]
    return peer


async def _refused(server: Server, room_id: str, token: Any) -> None:
    peer = await server.connect(room_id)
    await peer.send({"type": "join", "resume": token})
    await peer.expect_error("resume-refused")
    assert await peer.closed() == 4410


async def _nothing_pending(peer: Peer) -> None:
    """The next thing it gets is the answer to a ping: no peer-left (or else) came before."""
    await peer.send({"type": "ping"})
    assert await peer.recv() == {"type": "pong"}


async def test_resume_on_the_same_instance(server: Server) -> None:
    room_id, pin = await server.create_room(withPin=True)
    alice = await server.join(room_id, pin)
    bob = await server.join(room_id, pin)
    await alice.expect("peer-joined")
    token = bob.welcome["resume"]
    assert isinstance(token, str) and len(token) >= 22
    await _drop(bob, server)
    for i in range(5):
        await alice.send({"type": "signal", "to": bob.id, "data": {"n": i}})
    await _nothing_pending(alice)  # the signals were accepted: bob is still in the room
    again = await _resume(server, room_id, token)
    assert again.id == bob.id and again.welcome["resumed"] is True
    assert again.welcome["peers"] == [alice.id]
    assert again.welcome["resume"] != token
    for i in range(5):
        assert await again.expect("signal") == {
            "type": "signal",
            "from": alice.id,
            "data": {"n": i},
        }
    await _nothing_pending(alice)  # nobody saw bob leave or join
    await again.send({"type": "signal", "to": alice.id, "data": "back"})
    assert (await alice.expect("signal"))["data"] == "back"
    await _refused(server, room_id, token)  # a token works once
    await again.ws.close()  # a clean close is a leave, at once
    assert (await alice.expect("peer-left"))["peerId"] == bob.id


async def test_token_only_for_its_room_and_not_made_up(server: Server) -> None:
    room_id, _ = await server.create_room()
    other_room, _ = await server.create_room()
    alice = await server.join(room_id)
    await _drop(alice, server)
    await _refused(server, other_room, alice.welcome["resume"])  # stolen into another room
    await _refused(server, room_id, "x" * 24)
    peer = await server.connect(room_id)
    await peer.send({"type": "join", "resume": 5})
    await peer.expect_error("bad-message")
    again = await _resume(server, room_id, alice.welcome["resume"])  # still good for its room
    assert again.id == alice.id


async def test_held_peer_is_gone_after_the_window_or_past_the_bound(
    start_server: StartServer,
) -> None:
    server = await start_server(resume_window=1.0, ws_messages_per_second=10_000)
    room_id, _ = await server.create_room(maxPeers=3)
    alice = await server.join(room_id)
    bob = await server.join(room_id)
    carol = await server.join(room_id)
    for _ in range(2):
        await alice.expect("peer-joined")
    await bob.expect("peer-joined")
    bob.ws.transport.abort()  # held for a second, then gone
    assert (await alice.expect("peer-left"))["peerId"] == bob.id  # the window passed
    assert (await carol.expect("peer-left"))["peerId"] == bob.id
    await _refused(server, room_id, bob.welcome["resume"])

    server = await start_server(resume_window=60.0, ws_messages_per_second=10_000)
    room_id, _ = await server.create_room()
    alice = await server.join(room_id)
    bob = await server.join(room_id)
    await alice.expect("peer-joined")
    await _drop(bob, server)
    big = "x" * 16_000
    sent = 0
    while True:  # until the server says bob is gone: 256 KiB queued at most (bounded loop)
        await alice.send({"type": "signal", "to": bob.id, "data": big})
        sent += 1
        assert sent < 200
        if sent >= 17:
            message = await alice.recv(timeout=5)
            if message["type"] == "peer-left":
                break
    await _refused(server, room_id, bob.welcome["resume"])


async def test_resume_on_another_instance(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    a = await start_server(redis=redis_server.url)
    b = await start_server(redis=redis_server.url)
    c = await start_server(redis=redis_server.url)
    room_id, pin = await a.create_room(withPin=True, maxPeers=3)
    alice = await a.join(room_id, pin)
    bob = await b.join(room_id, pin)
    carol = await c.join(room_id, pin)
    for peer, count in ((alice, 2), (bob, 1)):
        for _ in range(count):
            await peer.expect("peer-joined")
    await _drop(bob, b)
    for i in range(5):  # queued for bob on b, in order
        await alice.send({"type": "signal", "to": bob.id, "data": {"a": i}})
        await carol.send({"type": "signal", "to": bob.id, "data": {"c": i}})
    await _nothing_pending(alice)
    await _nothing_pending(carol)
    # The signals were accepted; they reach b's queue through Redis before the handover (b's
    # inbox is read in order, and the resume's request comes after them).
    again = await _resume(a, room_id, bob.welcome["resume"])  # on another instance
    assert again.id == bob.id and sorted(again.welcome["peers"]) == sorted([alice.id, carol.id])
    got: dict[str, list[Any]] = {alice.id: [], carol.id: []}
    for _ in range(10):
        message = await again.expect("signal")
        got[message["from"]].append(message["data"])
    assert got == {alice.id: [{"a": i} for i in range(5)], carol.id: [{"c": i} for i in range(5)]}
    await _nothing_pending(alice)
    await _nothing_pending(carol)
    # bob is on a now: everyone reaches it, it reaches everyone.
    for sender in (alice, carol):
        await sender.send({"type": "signal", "to": bob.id, "data": "hi"})
        assert (await again.expect("signal"))["from"] == sender.id
        await again.send({"type": "signal", "to": sender.id, "data": "hi"})
        assert (await sender.expect("signal"))["from"] == bob.id
    await _refused(b, room_id, bob.welcome["resume"])  # used up, on every instance
    await _refused(a, room_id, bob.welcome["resume"])
    await again.ws.close()
    for peer in (alice, carol):
        assert (await peer.expect("peer-left"))["peerId"] == bob.id
