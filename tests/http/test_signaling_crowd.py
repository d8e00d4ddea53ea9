"""Signaling with many peers at once, and the parts that make it cheap: the room cache and its
writer, creates sharing a transaction, relayed data sliced from the frame, the lane.

Functional only: how fast is bench/signaling.py's business.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from httpkit import Peer, Server, StartProcess, StartServer
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from p2pserver import messages as m
from p2pserver.roomcache import RoomCache
from p2pserver.rooms import Room, RoomStore
from p2pserver.wsserver import Flag, Inbox, text_frame_header


@pytest.fixture
def many_files() -> None:
    """Room for a thousand sockets each side (CI machines often start at 1,024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


async def _bounded(jobs: list[Any], limit: int) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def run(job: Any) -> Any:
        async with gate:
            return await job

    return await asyncio.gather(*(run(job) for job in jobs))


async def test_256_joins_in_flight_all_get_their_welcome(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The whole join path under a crowd. The rooms are fresh, so no touch reaches SQLite here
    # (RoomCache.touch); the store's own concurrency is test_rooms_store's
    # test_concurrent_joins_and_touches_share_one_connection.
    server = await start_server(ws_connections_per_ip=1000, rooms_per_minute=10**6)
    rooms = [room for room, _ in await _bounded([server.create_room() for _ in range(128)], 32)]
    with caplog.at_level(logging.ERROR, logger="p2pserver"):
        peers = await asyncio.gather(*(server.join(room) for room in rooms + rooms))
    assert len({peer.id for peer in peers}) == 256
    for room in rooms:  # each room got its two peers, in some order
        first, second = sorted((p for p in peers if p.ws.request.path.endswith(room)), key=_n)
        assert second.welcome["peers"] == [first.id]
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    await _bounded([peer.alive() for peer in peers], 64)


def _n(peer: Peer) -> int:
    return len(peer.welcome["peers"])


async def test_a_thousand_idle_peers_stay_and_hear_joins_and_leaves(
    many_files: None, start_process: StartProcess
) -> None:
    _, server = await start_process(
        "--ws-connections-per-ip", "5000", "--rooms-per-minute", "1000000"
    )
    rooms = [room for room, _ in await _bounded([server.create_room() for _ in range(500)], 32)]
    firsts: list[Peer] = await _bounded([server.join(room) for room in rooms], 64)
    seconds: list[Peer] = await _bounded([server.join(room) for room in rooms], 64)
    assert all(b.welcome["peers"] == [a.id] for a, b in zip(firsts, seconds, strict=True))

    async def heard_join(a: Peer, b: Peer) -> None:
        assert await a.expect("peer-joined") == {"type": "peer-joined", "peerId": b.id}

    await _bounded([heard_join(a, b) for a, b in zip(firsts, seconds, strict=True)], 64)
    async with server.client() as http:
        stats = (await http.get("/healthz")).json()["signaling"]
    assert stats == {"connections": 1000, "rooms": 500, "peers": 1000}
    await _bounded([peer.alive() for peer in firsts + seconds], 64)  # all still connected

    async def leave(a: Peer, b: Peer) -> None:
        await b.ws.close()
        assert await a.expect("peer-left") == {"type": "peer-left", "peerId": b.id}

    await _bounded([leave(a, b) for a, b in zip(firsts, seconds, strict=True)], 64)
    await _bounded([peer.alive() for peer in firsts], 64)


async def test_compression_only_when_asked(start_server: StartServer) -> None:
    for setting, offered in ((False, None), (True, "permessage-deflate")):
        server = await start_server(ws_compression=setting)
        room_id, _ = await server.create_room()
        async with connect(f"{server.ws_url}/ws/{room_id}", proxy=None) as ws:
            assert ws.response is not None
            extensions = ws.response.headers.get("Sec-WebSocket-Extensions")
            assert (extensions or "").split(";")[0] == (offered or "")
            peer = Peer(ws)
            await peer.send({"type": "join"})
            await peer.expect("welcome")
            await peer.alive()


async def test_relayed_data_is_what_was_sent_however_it_was_spelled(server: Server) -> None:
    room_id, _ = await server.create_room()
    a = await server.join(room_id)
    b = await server.join(room_id)
    await a.expect("peer-joined")
    data = {"sdp": "v=0\r\n\u00e9\U0001f600", "n": [1, 2.5, None, True], "": {}}
    frames = [
        json.dumps({"type": "signal", "to": b.id, "data": data}, separators=(",", ":")),
        json.dumps({"data": data, "to": b.id, "type": "signal"}),  # any order, any spacing
        json.dumps({"type": "signal", "to": b.id, "data": data, "x": 1}, ensure_ascii=False),
    ]
    for frame in frames:
        await a.ws.send(frame)
        assert await b.recv() == {"type": "signal", "from": a.id, "data": data}


def test_signal_data_is_sliced_only_from_the_plain_spelling() -> None:
    plain = '{"type":"signal","to":"abc","data":{"x":[1,2]}}'
    assert m.signal_data_text(plain, json.loads(plain)) == '{"x":[1,2]}'
    for other in (
        '{"type": "signal", "to": "abc", "data": 1}',  # spaces
        '{"to":"abc","type":"signal","data":1}',  # order
        '{"type":"signal","to":"abc","data":1,"more":2}',  # more members
        '{"type":"signal","to":"a\\"bc","data":1}',  # an escaped "to"
    ):
        assert m.signal_data_text(other, json.loads(other)) is None
    assert m.encode_signal("p", {"x": 1}, '{"x":1}') == m.encode_signal("p", {"x": 1})


def test_text_frame_headers() -> None:  # RFC 6455 §5.2
    assert text_frame_header(125) == b"\x81\x7d"
    assert text_frame_header(126) == b"\x81\x7e\x00\x7e"
    assert text_frame_header(65535) == b"\x81\x7e\xff\xff"
    assert text_frame_header(65536) == b"\x81\x7f" + (65536).to_bytes(8, "big")


async def test_inbox_and_flag_keep_order_and_wake_their_waiters() -> None:
    inbox, flag = Inbox(), Flag()
    getter = asyncio.create_task(inbox.get())
    waiter = asyncio.create_task(flag.wait())
    await asyncio.sleep(0)
    assert not getter.done() and not waiter.done()
    inbox.put_nowait(1)
    inbox.put_nowait(2)
    flag.set()
    assert await getter == 1 and await inbox.get() == 2 and inbox.empty()
    await waiter
    flag.clear()
    assert not flag.is_set()


class CountingStore:
    """A RoomStore stand-in that counts what reaches it."""

    def __init__(self, ttl: float = 100.0) -> None:
        self.ttl = ttl
        self.rooms: dict[str, Room] = {}
        self.gets = 0
        self.touches: list[tuple[list[str], float]] = []

    async def create_room(self, **options: Any) -> tuple[Room, str | None]:
        room = Room(f"room{len(self.rooms):012d}", None, options["max_peers"], 0.0, 0.0)
        self.rooms[room.id] = room
        return room, None

    async def get(self, room_id: str, now: float) -> Room | None:
        self.gets += 1
        room = self.rooms.get(room_id)
        return room if room is not None and room.last_active > now - self.ttl else None

    async def touch(self, room_ids: list[str], now: float) -> None:
        self.touches.append((sorted(room_ids), now))
        await asyncio.sleep(0.01)  # writes take a while: touches pile up meanwhile

    async def sweep(self, now: float) -> int:
        return 0

    async def close(self) -> None:
        pass


async def test_cache_answers_joins_and_batches_touches() -> None:
    store = CountingStore()
    cache = RoomCache(store)  # type: ignore[arg-type]
    room_id, _ = await cache.create(with_pin=False, max_peers=2, now=0.0)
    for _ in range(10):
        room = await cache.get(room_id, 50.0)
        assert room is not None and room.id == room_id
    assert store.gets == 0
    others = [(await cache.create(with_pin=False, max_peers=2, now=0.0))[0] for _ in range(50)]
    for i, other in enumerate(others):
        await cache.touch([other], 10.0 + i)
    await cache.flush()
    assert len(store.touches) < 50  # batched
    assert sorted(i for batch, _ in store.touches for i in batch) == sorted(others)
    assert store.touches[-1][1] == 59.0
    # Touched here, so alive here at 105 (the store, not yet told, would say expired).
    room = await cache.get(others[-1], 105.0)
    assert room is not None and room.last_active == 59.0
    assert await cache.get(room_id, 100.0) is None  # expired: re-read, and the store agrees
    assert store.gets == 1
    await cache.close()


async def test_cache_skips_touches_of_rooms_it_knows_are_fresh() -> None:
    store = CountingStore(ttl=1000.0)  # touches within 10 s (1 % of the TTL) are not written
    cache = RoomCache(store)  # type: ignore[arg-type]
    room_id, _ = await cache.create(with_pin=False, max_peers=2, now=0.0)  # last_active 0.0
    await cache.touch([room_id], 5.0)  # its first join, right after the create
    await cache.flush()
    assert store.touches == []
    await cache.touch([room_id], 10.5)
    await cache.flush()
    assert store.touches == [([room_id], 10.5)]
    await cache.touch([room_id], 15.0)  # 4.5 s after the last write
    await cache.touch(["room999999999999"], 15.0)  # not cached: always written
    await cache.flush()
    assert store.touches[1:] == [(["room999999999999"], 15.0)]
    await cache.close()


async def test_cache_rereads_old_entries(tmp_path: Path) -> None:
    store = await RoomStore.open(str(tmp_path / "a.db"), ttl=100, sync="full")  # on disk at once
    cache = RoomCache(store, max_age=0.0)
    room_id, _ = await cache.create(with_pin=False, max_peers=2, now=1000.0)
    with sqlite3.connect(tmp_path / "a.db") as db:  # another process deletes it
        db.execute("DELETE FROM rooms")
    assert await cache.get(room_id, 1001.0) is None
    await cache.close()


async def test_concurrent_creates_share_transactions_and_all_land(tmp_path: Path) -> None:
    store = await RoomStore.open(str(tmp_path / "a.db"), ttl=100)
    created = await asyncio.gather(
        *(store.create_room(with_pin=i % 50 == 0, max_peers=2, now=1000.0) for i in range(300))
    )
    assert len({room.id for room, _ in created}) == 300
    assert await store.count() == 300
    for made, pin in created[::50]:
        room = await store.get(made.id, 1001.0)
        assert room is not None and pin is not None and await store.verify_pin(room, pin)
    await store.close()
    with sqlite3.connect(tmp_path / "a.db") as db:  # committed, not just visible
        assert db.execute("SELECT count(*) FROM rooms").fetchone() == (300,)


async def test_a_fault_in_a_joined_peers_frame_costs_only_that_peer(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    room_id, _ = await server.create_room()
    a = await server.join(room_id)
    b = await server.join(room_id)
    c_room, _ = await server.create_room()
    c = await server.join(c_room)
    hub = server.app.state.hub

    def broken(*args: object) -> None:
        raise OSError("broken on purpose")

    hub._signal = broken  # the next signal, taken on the lane, hits a fault
    with caplog.at_level(logging.ERROR, logger="p2pserver"):
        await a.send({"type": "signal", "to": b.id, "data": 1})
        assert await a.closed() == 1011
    assert await b.expect("peer-left") == {"type": "peer-left", "peerId": a.id}
    assert any("signaling fault" in r.getMessage() for r in caplog.records)
    await b.alive()
    await c.alive()


def test_ws_compression_flag_and_variable() -> None:
    from p2pserver.cli import parse_settings

    assert parse_settings([], environ={}).ws_compression is False
    assert parse_settings(["--ws-compression", "on"], environ={}).ws_compression is True
    assert parse_settings([], environ={"P2P_WS_COMPRESSION": "on"}).ws_compression is True
    assert parse_settings(["--ws-compression", "off"], environ={"P2P_WS_COMPRESSION": "on"}) == (
        parse_settings([], environ={})
    )


async def test_a_joined_peer_that_stops_reading_is_dropped_and_the_sender_carries_on(
    start_server: StartServer,
) -> None:
    server = await start_server(ws_messages_per_second=100_000)
    room_id, _ = await server.create_room()
    a = await server.join(room_id)
    # b's client stops reading after one message: the server's buffer for it grows instead.
    b_ws = await connect(f"{server.ws_url}/ws/{room_id}", proxy=None, max_queue=1)
    b = Peer(b_ws)
    await b.send({"type": "join"})
    b_id = (await b.expect("welcome"))["peerId"]
    await a.expect("peer-joined")
    big = "x" * 60_000
    first = asyncio.create_task(a.recv())
    for _ in range(400):  # 24 MB: more than loopback's socket buffers and the 1 MiB bound
        await a.send({"type": "signal", "to": b_id, "data": big})
        await asyncio.sleep(0)
        if first.done():  # a hears something: that b has gone, it should be
            break
    assert await first == {"type": "peer-left", "peerId": b_id}
    await a.alive()
    b_ws.transport.abort()


async def test_a_joined_peer_sending_invalid_utf8_is_closed_with_1007(server: Server) -> None:
    room_id, _ = await server.create_room()
    a = await server.join(room_id)
    b = await server.join(room_id)
    await a.expect("peer-joined")
    # A text frame whose payload is not UTF-8, written raw (a client library would refuse):
    # FIN + text, masked, 2 bytes (RFC 6455 §5.2); mask 0 leaves the payload as it is.
    b.ws.transport.write(b"\x81\x82\x00\x00\x00\x00\xff\xfe")
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(b.ws.recv(), 20)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007  # RFC 6455 §8.1
    assert await a.expect("peer-left") == {"type": "peer-left", "peerId": b.id}
    await a.alive()
