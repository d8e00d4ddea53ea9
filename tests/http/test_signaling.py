"""WebSocket signaling at /ws/{roomId} through a real uvicorn socket."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import pytest
from httpkit import TIMEOUT, Server, StartServer, wait_on_disk, wait_until
from websockets.exceptions import InvalidStatus

from p2pserver import credentials
from p2pserver.config import Settings
from p2pserver.signaling import MAX_QUEUED_ITEMS, Connection, Hub


async def test_join_room_without_pin(server: Server) -> None:
    room_id, _ = await server.create_room()
    a = await server.join(room_id)
    assert a.welcome["peers"] == []
    assert isinstance(a.id, str) and len(a.id) >= 8
    b = await server.join(room_id, pin="123456")  # a PIN for a PIN-less room is ignored
    assert b.welcome["peers"] == [a.id]
    assert await a.expect("peer-joined") == {"type": "peer-joined", "peerId": b.id}
    assert a.id != b.id


async def test_welcome_carries_the_rooms_ice_transport_policy(server: Server) -> None:
    public_id, _ = await server.create_room()
    private_id, pin = await server.create_room(private=True, withPin=True)
    assert (await server.join(public_id)).welcome["iceTransportPolicy"] == "all"
    first = await server.join(private_id, pin)
    second = await server.join(private_id, pin)
    for peer in (first, second):  # every peer of a private room is told, not only its creator
        assert peer.welcome["iceTransportPolicy"] == "relay"
        assert peer.welcome["iceServers"]  # and still gets the TURN credentials it needs


async def test_join_with_pin(server: Server) -> None:
    room_id, pin = await server.create_room(withPin=True)
    assert pin is not None
    peer = await server.join(room_id, pin)
    assert peer.welcome["type"] == "welcome"


async def test_pin_required(server: Server) -> None:
    room_id, _ = await server.create_room(withPin=True)
    peer = await server.connect(room_id)
    await peer.send({"type": "join"})
    await peer.expect_error("pin-required")
    assert await peer.closed() == 4401


async def test_wrong_pin(server: Server) -> None:
    room_id, pin = await server.create_room(withPin=True)
    assert pin is not None
    peer = await server.connect(room_id)
    await peer.send({"type": "join", "pin": f"{(int(pin) + 1) % 10**6:06d}"})
    await peer.expect_error("wrong-pin")
    assert await peer.closed() == 4403


async def test_room_not_found(server: Server) -> None:
    peer = await server.connect("A" * 22)
    await peer.send({"type": "join"})
    await peer.expect_error("room-not-found")
    assert await peer.closed() == 4404


async def _wrong_pin(server: Server, room_id: str, pin: str, address: str, code: str) -> None:
    peer = await server.connect(room_id, **{"x-forwarded-for": address})
    await peer.send({"type": "join", "pin": f"{(int(pin) + 1) % 10**6:06d}"})
    await peer.expect_error(code)
    await peer.closed()


async def test_pin_lockout_per_room_and_per_address(start_server: StartServer) -> None:
    server = await start_server(pin_attempts=3, rooms_per_minute=100)
    room_a, pin_a = await server.create_room(withPin=True)
    room_b, pin_b = await server.create_room(withPin=True)
    assert pin_a and pin_b
    for _ in range(3):
        await _wrong_pin(server, room_a, pin_a, "198.51.100.1", "wrong-pin")

    # The room is locked, even for the right PIN from another address.
    peer = await server.connect(room_a, **{"x-forwarded-for": "198.51.100.2"})
    await peer.send({"type": "join", "pin": pin_a})
    await peer.expect_error("too-many-attempts")
    assert await peer.closed() == 4429

    # The guessing address is locked everywhere, even with a room's right PIN.
    peer = await server.connect(room_b, **{"x-forwarded-for": "198.51.100.1"})
    await peer.send({"type": "join", "pin": pin_b})
    await peer.expect_error("too-many-attempts")
    assert await peer.closed() == 4429

    # Other rooms from other addresses are not affected.
    joined = await server.join(room_b, pin_b, **{"x-forwarded-for": "198.51.100.3"})
    assert joined.welcome["type"] == "welcome"


async def test_parallel_guesses_cannot_overshoot_the_limit(start_server: StartServer) -> None:
    server = await start_server(pin_attempts=2)
    room_id, pin = await server.create_room(withPin=True)
    assert pin is not None
    wrong = f"{(int(pin) + 1) % 10**6:06d}"
    peers = [await server.connect(room_id) for _ in range(8)]
    await asyncio.gather(*(p.send({"type": "join", "pin": wrong}) for p in peers))
    codes = [(await p.expect("error"))["code"] for p in peers]
    # Exactly the attempts allowed are judged (and wrong); every other guess is refused unjudged.
    assert sorted(codes) == sorted(["wrong-pin"] * 2 + ["too-many-attempts"] * 6), codes


async def test_room_full(server: Server) -> None:
    room_id, _ = await server.create_room()  # default: 2 peers
    await server.join(room_id)
    await server.join(room_id)
    third = await server.connect(room_id)
    await third.send({"type": "join"})
    await third.expect_error("room-full")
    assert await third.closed() == 4409


async def test_max_peers_and_room_frees_up(server: Server) -> None:
    room_id, _ = await server.create_room(maxPeers=3)
    a = await server.join(room_id)
    b = await server.join(room_id)
    c = await server.join(room_id)
    assert sorted(c.welcome["peers"]) == sorted([a.id, b.id])
    await c.ws.close()
    await a.expect("peer-joined")
    await a.expect("peer-joined")
    assert await a.expect("peer-left") == {"type": "peer-left", "peerId": c.id}
    d = await server.join(room_id)  # the place c left is free again
    assert sorted(d.welcome["peers"]) == sorted([a.id, b.id])


async def test_signal_reaches_its_target_only(server: Server) -> None:
    room_id, _ = await server.create_room(maxPeers=3)
    a = await server.join(room_id)
    b = await server.join(room_id)
    c = await server.join(room_id)
    await a.expect("peer-joined")
    await a.expect("peer-joined")
    await b.expect("peer-joined")
    offer = {"sdp": "v=0...", "type": "offer", "nested": [1, {"x": None}]}
    await a.send({"type": "signal", "to": b.id, "data": offer})
    await a.send({"type": "signal", "to": c.id, "data": "marker"})
    assert await b.recv() == {"type": "signal", "from": a.id, "data": offer}
    # a's frames are relayed in order, so had c been sent the offer it would come first.
    assert await c.recv() == {"type": "signal", "from": a.id, "data": "marker"}


async def test_unknown_peer_is_not_fatal(server: Server) -> None:
    room_id, _ = await server.create_room()
    a = await server.join(room_id)
    await a.send({"type": "signal", "to": "nobody", "data": 1})
    await a.expect_error("unknown-peer")
    await a.send({"type": "signal", "to": a.id, "data": 1})  # not to oneself either
    await a.expect_error("unknown-peer")
    other_room, _ = await server.create_room()
    stranger = await server.join(other_room)
    await a.send({"type": "signal", "to": stranger.id, "data": 1})  # nor across rooms
    await a.expect_error("unknown-peer")
    await a.alive()


async def test_peer_left_on_disconnect(server: Server) -> None:
    room_id, _ = await server.create_room()
    a = await server.join(room_id)
    b = await server.join(room_id)
    await a.expect("peer-joined")
    await b.ws.close()
    assert await a.expect("peer-left") == {"type": "peer-left", "peerId": b.id}


async def test_peer_left_on_abrupt_disconnect(start_server: StartServer) -> None:
    server = await start_server(resume_window=0.5)
    room_id, _ = await server.create_room()
    a = await server.join(room_id)
    b = await server.join(room_id)
    await a.expect("peer-joined")
    b.ws.transport.abort()  # no close frame: held for a resume (test_resume.py), then gone
    assert await a.expect("peer-left") == {"type": "peer-left", "peerId": b.id}


async def test_ping_pong_before_and_after_join(server: Server) -> None:
    room_id, _ = await server.create_room()
    peer = await server.connect(room_id)
    await peer.send({"type": "ping"})
    assert await peer.recv() == {"type": "pong"}
    await peer.send({"type": "join"})
    await peer.expect("welcome")
    await peer.send({"type": "ping"})
    assert await peer.recv() == {"type": "pong"}


@pytest.mark.parametrize(
    "frame",
    [
        "not json",
        "[1, 2]",
        "42",
        '{"no": "type"}',
        '{"type": 5}',
        '{"type": "dance"}',
        '{"type": "signal", "data": 1}',
        '{"type": "signal", "to": 5, "data": 1}',
        '{"type": "signal", "to": "x"}',
        '{"type": "join"}',
        "[" * 5000 + "]" * 5000,
        b"\x00binary",
    ],
)
async def test_malformed_frames_are_answered_and_others_carry_on(
    server: Server, frame: str | bytes
) -> None:
    room_id, _ = await server.create_room()
    a = await server.join(room_id)
    b = await server.join(room_id)
    await a.expect("peer-joined")
    await b.ws.send(frame)  # '{"type": "join"}' here is a second join
    await b.expect_error("bad-message")
    await b.alive()
    await a.send({"type": "signal", "to": b.id, "data": "still here"})
    assert await b.recv() == {"type": "signal", "from": a.id, "data": "still here"}


async def test_signal_before_join_is_bad_message(server: Server) -> None:
    room_id, _ = await server.create_room()
    peer = await server.connect(room_id)
    await peer.send({"type": "signal", "to": "x", "data": 1})
    await peer.expect_error("bad-message")
    await peer.send({"type": "join", "pin": 123456})  # the PIN must be a string
    await peer.expect_error("bad-message")
    await peer.send({"type": "join"})
    await peer.expect("welcome")


async def test_oversized_frames(start_server: StartServer) -> None:
    server = await start_server(ws_max_message=1024)
    room_id, _ = await server.create_room()
    a = await server.join(room_id)
    b = await server.join(room_id)
    await a.expect("peer-joined")
    fits = "é" * 400  # 800 bytes of UTF-8 inside a ~850-byte frame
    await a.ws.send(json.dumps({"type": "signal", "to": b.id, "data": fits}, ensure_ascii=False))
    assert (await b.recv())["data"] == fits
    big = {"type": "signal", "to": b.id, "data": "é" * 600}  # 600 characters, 1200 bytes
    await a.ws.send(json.dumps(big, ensure_ascii=False))
    error = await a.expect_error("too-large")
    assert "1024" in error["message"]
    await a.alive()
    await a.send({"type": "signal", "to": b.id, "data": "after"})
    assert (await b.recv())["data"] == "after"  # b never saw the oversized frame

    # Beyond ws_max_message + 1 KiB the WebSocket layer itself closes with 1009 (too big).
    await b.ws.send("x" * 4096)
    assert await b.closed() == 1009
    assert await a.expect("peer-left") == {"type": "peer-left", "peerId": b.id}
    await a.alive()


async def test_rate_limited_and_others_unaffected(start_server: StartServer) -> None:
    # 0.01/s refills nothing during the test; the bucket starts with its 10-message burst.
    server = await start_server(ws_messages_per_second=0.01, ws_max_errors=1000)
    room_id, _ = await server.create_room()
    a = await server.join(room_id)
    b = await server.join(room_id)
    await a.expect("peer-joined")
    for _ in range(30):
        await a.send({"type": "ping"})
    replies = [await a.recv() for _ in range(30)]
    kinds = [r.get("code", r["type"]) for r in replies]
    assert kinds.count("pong") == 9  # 10 tokens, one spent on join
    assert kinds.count("rate-limited") == 21
    # b has its own bucket and still gets through to a.
    await b.send({"type": "signal", "to": a.id, "data": "hi"})
    assert await a.recv() == {"type": "signal", "from": b.id, "data": "hi"}


async def test_flooding_peer_is_closed_and_others_carry_on(start_server: StartServer) -> None:
    server = await start_server(ws_max_errors=5)
    room_id, _ = await server.create_room(maxPeers=3)
    a = await server.join(room_id)
    b = await server.join(room_id)
    c = await server.join(room_id)
    for _ in range(20):
        try:
            await b.ws.send("garbage")
        except Exception:
            break
    codes: list[str] = []
    async with asyncio.timeout(TIMEOUT):
        while not codes or codes[-1] != "too-many-errors":
            message = await b.recv()
            if message["type"] == "error":
                codes.append(message["code"])
    assert codes == ["bad-message"] * 5 + ["too-many-errors"]
    assert await b.closed() == 4400
    await a.expect("peer-joined")
    await a.expect("peer-joined")
    assert await a.expect("peer-left") == {"type": "peer-left", "peerId": b.id}
    await a.send({"type": "signal", "to": c.id, "data": "ok"})
    async with asyncio.timeout(TIMEOUT):
        while (message := await c.recv())["type"] != "signal":
            pass
    assert message == {"type": "signal", "from": a.id, "data": "ok"}


async def test_join_timeout(start_server: StartServer) -> None:
    server = await start_server(ws_join_timeout=0.5)
    room_id, _ = await server.create_room()
    peer = await server.connect(room_id)
    await peer.expect_error("join-timeout")
    assert await peer.closed() == 4408


async def test_connections_per_address(start_server: StartServer) -> None:
    server = await start_server(ws_connections_per_ip=2)
    room_id, _ = await server.create_room(maxPeers=3)
    first = await server.join(room_id)
    await server.connect(room_id)  # counted before it joins
    third = await server.connect(room_id)
    await third.expect_error("too-many-connections")
    assert await third.closed() == 4430
    other = await server.join(room_id, **{"x-forwarded-for": "203.0.113.9"})
    assert other.welcome["peers"] == [first.id]
    await first.ws.close()
    await wait_until(lambda: server.app.state.hub.stats()["connections"] == 2)
    again = await server.join(room_id)  # a slot of the address is free again
    assert again.welcome["peers"] == [other.id]


async def test_ice_servers_in_welcome(start_server: StartServer) -> None:
    server = await start_server(secret="s3cret", turn_port=3479, ice_ttl=900)
    room_id, _ = await server.create_room()
    before = time.time()
    peer = await server.join(room_id)
    stun, turn = peer.welcome["iceServers"]
    assert stun == {"urls": ["stun:127.0.0.1:3479"]}
    assert turn["urls"] == [
        "turn:127.0.0.1:3479?transport=udp",
        "turn:127.0.0.1:3479?transport=tcp",
    ]
    expiry, _, user = turn["username"].partition(":")
    assert user == peer.id
    assert int(before) + 900 <= int(expiry) <= time.time() + 900
    assert turn["credential"] == credentials.rest_password("s3cret", turn["username"])


async def test_ice_servers_public_host_and_ipv6(start_server: StartServer) -> None:
    server = await start_server(public_host="2001:db8::5")
    room_id, _ = await server.create_room()
    peer = await server.join(room_id)
    assert peer.welcome["iceServers"][0] == {"urls": ["stun:[2001:db8::5]:3478"]}


async def test_ice_host_follows_host_header(server: Server) -> None:
    room_id, _ = await server.create_room()
    peer = await server.join(room_id, host="chat.example.org:3000")
    assert peer.welcome["iceServers"][0] == {"urls": ["stun:chat.example.org:3478"]}


async def test_generated_secret_signs_credentials(server: Server) -> None:
    room_id, _ = await server.create_room()
    peer = await server.join(room_id)
    with sqlite3.connect(server.settings.db) as db:
        (secret,) = db.execute("SELECT value FROM meta WHERE key = 'turn_secret'").fetchone()
    turn = peer.welcome["iceServers"][1]
    assert turn["credential"] == credentials.rest_password(secret, turn["username"])


async def test_join_touches_last_active(start_server: StartServer) -> None:
    creator = await start_server()
    room_id, _ = await creator.create_room()
    await wait_on_disk(creator.settings.db, room_id)
    old = time.time() - 3600  # idle for an hour, as the file says
    with sqlite3.connect(creator.settings.db) as db:
        db.execute("UPDATE rooms SET last_active = ? WHERE id = ?", (old, room_id))
    # Another server on the file (or this one after a restart) knows only what the file says;
    # the creator itself would not write a touch so soon after the create (RoomCache.touch).
    server = await start_server()
    await server.join(room_id)

    def touched() -> bool:
        with sqlite3.connect(server.settings.db) as db:
            (value,) = db.execute(
                "SELECT last_active FROM rooms WHERE id = ?", (room_id,)
            ).fetchone()
        return value > old + 3000

    await wait_until(touched)


async def test_websocket_origin_checked_against_cors_origins(start_server: StartServer) -> None:
    server = await start_server(cors_origins=("https://chat.example",))
    room_id, _ = await server.create_room()
    with pytest.raises(InvalidStatus) as info:
        await server.connect(room_id, origin="https://evil.example")
    assert info.value.response.status_code == 403
    peer = await server.join(room_id, origin="https://chat.example")
    assert peer.welcome["type"] == "welcome"


async def test_healthz_counts_signaling(server: Server) -> None:
    room_id, _ = await server.create_room()
    await server.join(room_id)
    await server.join(room_id)
    async with server.client() as http:
        body = (await http.get("/healthz")).json()
    assert body["signaling"] == {"connections": 2, "rooms": 1, "peers": 2}


async def test_shutdown_closes_websockets_with_1001(start_server: StartServer) -> None:
    server = await start_server()
    room_id, _ = await server.create_room()
    joined = await server.join(room_id)
    waiting = await server.connect(room_id)  # not joined yet
    await server.app.state.hub.close_all()
    assert await joined.closed() == 1001
    assert await waiting.closed() == 1001


class _StuckWebSocket:
    """A WebSocket whose client never reads: every send blocks."""

    def __init__(self) -> None:
        self.closed_with: tuple[int, str] | None = None
        self.sent = 0

    async def send_text(self, text: str) -> None:
        self.sent += 1
        await asyncio.Event().wait()

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed_with = (code, reason or "")


def _two_stuck_peers(settings: Settings | None = None) -> tuple[Hub, Connection, Connection]:
    """A hub with sender "s" and target "t" in one room, neither with a writer running."""
    settings = settings or Settings()
    hub = Hub(settings)
    now = asyncio.get_running_loop().time()
    sender = Connection(_StuckWebSocket(), "192.0.2.1", settings, now)  # type: ignore[arg-type]
    target = Connection(_StuckWebSocket(), "192.0.2.2", settings, now)  # type: ignore[arg-type]
    sender.peer_id, sender.room_id = "s", "room"
    target.peer_id, target.room_id = "t", "room"
    hub.rooms["room"] = {"s": sender, "t": target}
    return hub, sender, target


async def test_slow_receiver_is_dropped_without_blocking_the_sender() -> None:
    hub, sender, stuck = _two_stuck_peers(Settings(ws_max_message=1024))
    # Sending never awaits the receiver: signals pile up until the 1 MiB bound trips.
    sent = 0
    while not stuck.dead and sent < 2048:
        hub._signal(sender, {"type": "signal", "to": "t", "data": "x" * 1000})
        sent += 1
    assert stuck.dead
    assert 1000 <= sent <= 1100
    assert "t" not in hub.rooms["room"]
    assert not sender.dead
    # The stuck peer's backlog is dropped; what is left is the too-slow error and the close.
    assert json.loads(stuck._queue.get_nowait())["code"] == "too-slow"  # no writer ran
    closing = stuck._queue.get_nowait()
    assert getattr(closing, "code", None) == 4420


async def test_server_fault_closes_only_that_peer_with_1011(server: Server) -> None:
    room_id, _ = await server.create_room()
    a = await server.join(room_id)
    b = await server.connect(room_id)
    store = server.app.state.hub.store

    async def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk on fire")

    store.get = broken  # the next join hits a database fault
    await b.send({"type": "join"})
    assert await b.closed() == 1011
    await a.alive()


async def test_empty_pin_is_pin_required(server: Server) -> None:
    room_id, _ = await server.create_room(withPin=True)
    peer = await server.connect(room_id)
    await peer.send({"type": "join", "pin": ""})
    await peer.expect_error("pin-required")
    assert await peer.closed() == 4401


async def test_message_count_bound_drops_a_slow_peer() -> None:
    hub, sender, stuck = _two_stuck_peers()
    for _ in range(MAX_QUEUED_ITEMS):
        hub._signal(sender, {"type": "signal", "to": "t", "data": 1})
    assert not stuck.dead  # 1024 tiny messages: far below the byte bound
    hub._signal(sender, {"type": "signal", "to": "t", "data": 1})
    assert stuck.dead and "t" not in hub.rooms["room"]


async def test_data_too_deep_to_relay_is_bad_message_not_a_fault() -> None:
    hub, sender, target = _two_stuck_peers()
    deep: object = None
    for _ in range(100_000):
        deep = [deep]
    hub._signal(sender, {"type": "signal", "to": "t", "data": deep})
    assert json.loads(sender._queue.get_nowait())["code"] == "bad-message"
    assert not sender.dead and target._queue.empty()
