"""Redis lost while instances run, then back (a real redis-server, killed and restarted on
its port): the documented behaviour (docs/deploy.md), no traceback, no lost room."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from httpkit import Server, StartProcess, wait_until
from test_fleet import _signals

from rediskit import running_redis


async def _health(server: Server) -> tuple[int, dict]:
    async with server.client() as http:
        response = await http.get("/healthz")
    return response.status_code, response.json()


async def _create_status(server: Server) -> int:
    async with server.client() as http:
        return (await http.post("/create-chat", json={})).status_code


async def test_redis_lost_and_back_under_load(start_process: StartProcess, tmp_path: Path) -> None:
    with running_redis(tmp_path / "redis", persist=True) as redis:
        flags = ("--no-turn", "--redis", redis.url, "--rooms-per-minute", "100000")
        process_a, a = await start_process(*flags)
        process_b, b = await start_process(*flags)
        room_id, _ = await a.create_room(maxPeers=4)
        alice = await a.join(room_id)
        carol = await a.join(room_id)
        bob = await b.join(room_id)
        for peer, count in ((alice, 2), (carol, 1)):
            for _ in range(count):
                await peer.expect("peer-joined")

        # Load all along: rooms created on both instances, bounded in count and time.
        statuses: list[int] = []
        stop = asyncio.Event()

        async def load() -> None:
            for i in range(2000):
                if stop.is_set():
                    return
                try:
                    statuses.append(await _create_status((a, b)[i % 2]))
                except httpx.HTTPError:
                    statuses.append(0)
                await asyncio.sleep(0.02)

        loader = asyncio.create_task(load())
        await wait_until(lambda: 200 in statuses)
        redis.stop()  # SIGKILL: no goodbye from Redis either

        async def degraded() -> bool:
            code, body = await _health(a)
            return code == 503 and body["status"] == "degraded" and body["fleet"]["redis"] == "down"

        await wait_until(degraded)
        async with a.client() as http:
            refused = await http.post("/create-chat", json={})
        assert refused.status_code == 503 and refused.json()["error"] == "unavailable"
        assert refused.headers["retry-after"] == "5"
        await _signals(alice, carol, 20)  # peers on one instance keep talking
        await _signals(carol, alice, 20)
        late = await a.connect(room_id)
        await late.send({"type": "join"})
        await late.expect_error("unavailable")
        assert await late.closed() == 4503

        redis.start()  # the same port; the append-only file brings the rooms back
        for server in (a, b):
            await wait_until(lambda s=server: _health_ok(s))
        stop.set()
        await loader
        assert set(statuses) <= {200, 503}, statuses
        assert statuses[-1] == 200 or await _create_status(a) == 200

        # Everything works again, without a restart; nobody saw anyone leave.
        async with b.client() as http:
            assert (await http.get(f"/check-chat/{room_id}")).status_code == 200
        await _signals(alice, bob, 20)
        await _signals(bob, carol, 20)
        dave = await b.join(room_id)
        assert set(dave.welcome["peers"]) == {alice.id, carol.id, bob.id}
        for peer in (alice, carol, bob):
            assert (await peer.expect("peer-joined"))["peerId"] == dave.id
        await _signals(dave, alice, 5)

        log = process_a.log()  # both processes write to this one file
        assert "Traceback" not in log, log
        assert log.count("lost (") == 2, log  # each state change once per instance
        assert log.count("is back after") == 2, log
        process_b.kill()


async def _health_ok(server: Server) -> bool:
    try:
        code, body = await _health(server)
    except httpx.HTTPError:
        return False
    return code == 200 and body["status"] == "ok"
