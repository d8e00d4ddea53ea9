"""Instances sharing one Redis (`--redis`, a real redis-server): the same rooms, the same
limits, the same TURN secret, wherever a request lands."""

from __future__ import annotations

import asyncio

from httpkit import Server, StartProcess, StartServer

from rediskit import RedisServer


async def test_rooms_made_on_one_instance_are_served_by_another(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    a = await start_server(redis=redis_server.url)
    b = await start_server(redis=redis_server.url)
    room_id, pin = await a.create_room(withPin=True, maxPeers=3, private=True)
    async with b.client() as http:
        checked = await http.get(f"/check-chat/{room_id}")
        missing = await http.get("/check-chat/NoSuchRoomNoSuchRoom00")
    assert checked.json() == {"pin": True, "private": True}
    assert missing.status_code == 404
    assert pin is not None
    peer = await b.join(room_id, pin)
    assert peer.welcome["iceTransportPolicy"] == "relay"
    # One TURN secret for the fleet: credentials from any instance work on every TURN server.
    assert a.app.state.hub.secret == b.app.state.hub.secret != ""


async def test_create_chat_limit_holds_across_instances(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    a = await start_server(redis=redis_server.url, rooms_per_minute=3)
    b = await start_server(redis=redis_server.url, rooms_per_minute=3)

    async def create(server: Server, address: str) -> int:
        async with server.client(**{"x-forwarded-for": address}) as http:
            return (await http.post("/create-chat", json={})).status_code

    statuses = await asyncio.gather(*(create((a, b)[i % 2], "198.51.100.7") for i in range(8)))
    assert sorted(statuses) == [200] * 3 + [429] * 5
    assert await create(b, "198.51.100.8") == 200  # another address has its own count
    async with a.client(**{"x-forwarded-for": "198.51.100.7"}) as http:
        limited = await http.post("/create-chat", json={})
    assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 61


async def test_pin_lockout_holds_across_instances(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    a = await start_server(redis=redis_server.url, pin_attempts=2)
    b = await start_server(redis=redis_server.url, pin_attempts=2)
    room_id, pin = await a.create_room(withPin=True)
    assert pin is not None
    wrong = f"{(int(pin) + 1) % 10**6:06d}"
    for server, address in ((a, "198.51.100.1"), (b, "198.51.100.2")):
        peer = await server.connect(room_id, **{"x-forwarded-for": address})
        await peer.send({"type": "join", "pin": wrong})
        await peer.expect_error("wrong-pin")
        await peer.closed()
    # Two wrong PINs, one on each instance: the room is locked on both, even for the right PIN.
    for server in (a, b):
        peer = await server.connect(room_id, **{"x-forwarded-for": "198.51.100.3"})
        await peer.send({"type": "join", "pin": pin})
        await peer.expect_error("too-many-attempts")
        assert await peer.closed() == 4429
    # A right PIN does not count against the limit.
    other_id, other_pin = await a.create_room(withPin=True, maxPeers=4)
    for _ in range(3):
        await b.join(other_id, other_pin, **{"x-forwarded-for": "198.51.100.4"})


async def test_p2pserver_processes_share_rooms_through_redis(
    start_process: StartProcess, redis_server: RedisServer
) -> None:
    _, a = await start_process("--no-turn", "--redis", redis_server.url)
    _, b = await start_process("--no-turn", "--redis", redis_server.url)
    room_id, _ = await a.create_room()
    async with b.client() as http:
        assert (await http.get(f"/check-chat/{room_id}")).status_code == 200
        health = (await http.get("/healthz")).json()
    assert health["db"] == "ok"
