"""WebSocket signaling at /ws/{roomId}: the in-process hub of rooms -> peers, and its endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections import Counter
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket, WebSocketDisconnect

from p2pserver import messages as m
from p2pserver.config import Settings
from p2pserver.ice import host_from_header, ice_servers, url_host
from p2pserver.ratelimit import MemoryLimiter, SlidingWindow, TokenBucket
from p2pserver.roomcache import RoomCache
from p2pserver.rooms import Room
from p2pserver.store import Limiter, StoreUnavailable
from p2pserver.wsserver import LANE, Lane

if TYPE_CHECKING:  # redis is imported only with --redis
    from p2pserver.fleet import Fleet

log = logging.getLogger("p2pserver.signaling")

ERROR_WINDOW = 10.0  # seconds over which ws_max_errors counts a peer's errors
MIN_BURST = 10.0  # token bucket size floor, so ICE candidate bursts pass at low rates
MAX_QUEUED_ITEMS = 1024
MIN_QUEUED_BYTES = 1024 * 1024
# A dropped peer waiting to resume keeps at most MAX_QUEUED_ITEMS messages and this many bytes
# for itself; past either it is treated as gone (docs/api.md, resume).
HELD_MAX_BYTES = 256 * 1024
MOVED_FOR = 10.0  # seconds signals for a peer resumed on another instance are passed on
CLOSE_LOST = 1006  # RFC 6455 §7.1.5: the connection ended without a close frame


@dataclass(frozen=True)
class _Close:
    code: int
    reason: str


class Connection:
    """One WebSocket: its place in a room, its limits, and how messages reach it.

    With a Lane (our own uvicorn protocol, see wsserver.py) a message is written to the socket
    at once; otherwise it goes through a queue that a writer task empties. Either way a peer
    that reads slowly only ever delays itself: when its backlog (bytes the kernel has not taken,
    or the queue) passes a bound it is dropped (too-slow) instead.
    """

    __slots__ = (
        "_max_bytes",
        "_queue",
        "_queued_bytes",
        "_writer",
        "address",
        "bucket",
        "counted",
        "dead",
        "detached",
        "errors",
        "farewell",
        "held",
        "lane",
        "peer_id",
        "room_id",
        "timer",
        "token",
        "ws",
    )

    def __init__(
        self,
        ws: WebSocket,
        address: str,
        settings: Settings,
        now: float,
        lane: Lane | None = None,
    ) -> None:
        self.ws: WebSocket | None = ws
        self.lane = lane
        self.address = address
        self.peer_id: str | None = None
        self.room_id: str | None = None
        self.dead = False  # a close is queued: its input is ignored, nothing more is queued
        self.counted = False  # in Hub.connections and its address's count
        self.detached = False  # joined, and the lane took over from ASGI (ws is None then)
        self.token: str | None = None  # its resume token, from the welcome
        self.held = False  # the socket is gone; kept for a resume (timer ends the wait)
        self.timer: asyncio.TimerHandle | None = None
        self.farewell = False  # closed with a close frame (either side): left, no resume
        rate = settings.ws_messages_per_second
        self.bucket = TokenBucket(rate, max(MIN_BURST, rate), now)
        self.errors = SlidingWindow(settings.ws_max_errors, ERROR_WINDOW)  # >= 1: check_settings
        # A peer with a lane only queues its close: the queue is made when needed (memory).
        self._queue: asyncio.Queue[str | _Close] | None = None if lane else asyncio.Queue()
        self._queued_bytes = 0
        self._max_bytes = max(MIN_QUEUED_BYTES, 16 * settings.ws_max_message)
        self._writer: asyncio.Task[None] | None = None

    def send(self, message: dict[str, Any] | str) -> bool:
        """Queue a message (or its encoding); False when the backlog is over its bound."""
        if self.dead:
            return True
        text = message if isinstance(message, str) else m.encode(message)
        lane = self.lane
        queue = self._queue
        if lane is not None and (queue is None or queue.empty()):  # nothing queued: in order
            if lane.buffered() + len(text) > self._max_bytes:
                return False
            lane.send(text)  # False: gone; the reader sees the disconnect and cleans up
            return True
        queue = self._outbox()
        if queue.qsize() >= MAX_QUEUED_ITEMS or self._queued_bytes + len(text) > self._max_bytes:
            return False
        self._queued_bytes += len(text)
        queue.put_nowait(text)
        return True

    def hold(self) -> None:
        """The socket is gone but the peer may resume: from now on messages queue, bounded."""
        self.held = True
        self.lane = None
        self.ws = None
        self.detached = False
        self._max_bytes = HELD_MAX_BYTES
        self._outbox()

    def take_queued(self) -> list[str]:
        """What was queued for it (a held peer's messages, to go to its new connection)."""
        queue, frames = self._queue, []
        while queue is not None and not queue.empty():
            item = queue.get_nowait()
            if isinstance(item, str):
                frames.append(item)
        self._queued_bytes = 0
        return frames

    def _outbox(self) -> asyncio.Queue[str | _Close]:
        if self._queue is None:
            self._queue = asyncio.Queue()
        return self._queue

    def close(
        self, code: int, reason: str, *, error: m.ErrorCode | None = None, flush: bool = True
    ) -> None:
        """Queue an optional error and the close frame; `flush=False` drops what is pending."""
        if self.dead:
            return
        self.dead = True
        if self.detached and self.lane is not None:  # no ASGI any more: straight to the socket
            if error is not None:
                self.lane.send(m.encode(m.error(error)))
            self.lane.close(code, reason)
            return
        queue = self._outbox()
        if not flush:
            while not queue.empty():
                queue.get_nowait()
            self._queued_bytes = 0
        if error is not None:
            text = m.encode(m.error(error))
            self._queued_bytes += len(text)  # the writer takes it off again
            queue.put_nowait(text)
        queue.put_nowait(_Close(code, reason))
        if self.lane is not None:  # the close itself goes through ASGI, so a writer does it
            self.start_writer()

    def start_writer(self) -> None:
        if self._writer is None:
            self._writer = asyncio.create_task(self.run_writer())

    def cancel_writer(self) -> None:
        if self._writer is not None:
            self._writer.cancel()

    async def stop_writer(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer

    async def run_writer(self) -> None:
        assert self.ws is not None  # only a detached peer has none, and it has no writer
        try:
            while True:
                item = await self._outbox().get()
                if isinstance(item, _Close):
                    await self.ws.close(item.code, item.reason)
                    return
                self._queued_bytes -= len(item)
                await self.ws.send_text(item)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the client went away; the reader sees the disconnect and cleans up


def client_address(connection: HTTPConnection) -> str:
    """The address limits count by (X-Forwarded-For from a trusted proxy, as uvicorn reads it)."""
    return connection.client.host if connection.client else "unknown"


def origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    # Browsers always send Origin on WebSockets; other clients may not, and CORS never applied
    # to them anyway.
    return origin is None or "*" in allowed or origin in allowed


_NOBODY: Mapping[str, Any] = MappingProxyType({})  # a room not here: no dict built per frame
_MESSAGE_KEYS = {kind: f"messages.{kind}" for kind in ("join", "signal", "ping")}


class Hub:
    """Rooms -> peers of this process, and the rules for joining and relaying."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: RoomCache | None = None  # set by the app's lifespan
        self.secret = ""  # TURN REST API secret, set by the app's lifespan
        # check_settings guarantees --public-host is a host name or IP.
        self._public_host = url_host(settings.public_host) if settings.public_host else None
        self.rooms: dict[str, dict[str, Connection]] = {}
        # With --redis: the fleet, and per room with peers here, its peers on other instances.
        self.fleet: Fleet | None = None
        self.remote: dict[str, dict[str, str]] = {}
        self._fleet_drop_logged = -60.0
        self.connections: set[Connection] = set()
        self.tokens: dict[str, Connection] = {}  # resume token -> its peer's connection
        self._moved: dict[str, tuple[str, float]] = {}  # "room|peer" -> (instance, until)
        self.closing = False
        self._all_gone = asyncio.Event()  # set when closing and the last connection is gone
        self._per_address: Counter[str] = Counter()
        # Wrong PINs per room and per address; use_store puts them where the store keeps limits.
        self._room_failures: Limiter = MemoryLimiter(settings.pin_attempts, settings.pin_lockout)
        self._address_failures: Limiter = MemoryLimiter(settings.pin_attempts, settings.pin_lockout)

        # Counters for /metrics (docs/operations.md): "messages.<type>", "join_failures.<code>",
        # "pin_lockouts.<room|address>". Flat keys, read at scrape time; only ever incremented.
        self.counts: Counter[str] = Counter()

    def use_store(self, store: RoomCache | None) -> None:
        """Serve rooms from `store`, and keep the wrong-PIN counts where it keeps limits (in
        Redis with --redis, so the lock-out holds across instances)."""
        self.store = store
        if store is not None:
            limit, window = self.settings.pin_attempts, self.settings.pin_lockout
            self._room_failures = store.limiter("pin-room", limit, window)
            self._address_failures = store.limiter("pin-address", limit, window)

    # -- bookkeeping -------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        return {
            "connections": len(self.connections),
            "rooms": len(self.rooms),
            "peers": sum(len(peers) for peers in self.rooms.values()),
        }

    def active_rooms(self) -> list[str]:
        return list(self.rooms)

    def prune(self) -> None:
        self._room_failures.prune()
        self._address_failures.prune()
        now = time.monotonic()
        for key in [key for key, (_, until) in self._moved.items() if until <= now]:
            del self._moved[key]

    async def close_all(self) -> None:
        """Refuse new peers, close every socket with 1001 (going away), wait for them (5 s)."""
        self.closing = True
        conns = list(self.connections)
        for conn in conns:
            conn.close(m.CLOSE_GOING_AWAY, "server shutting down", flush=False)
        if conns:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_gone.wait(), 5.0)

    # -- the endpoint ------------------------------------------------------------------------

    async def serve(self, ws: WebSocket) -> None:
        if not origin_allowed(ws.headers.get("origin"), self.settings.cors_origins):
            await ws.close(1008)  # before accept: the handshake gets HTTP 403
            return
        await ws.accept()
        address = client_address(ws)
        lane: Lane | None = ws.scope.get("extensions", {}).get(LANE)
        conn = Connection(ws, address, self.settings, time.monotonic(), lane)
        if lane is None:
            conn.start_writer()
        detached = False
        try:
            if self.closing:
                conn.close(m.CLOSE_GOING_AWAY, "server shutting down")
            elif self._per_address[address] >= self.settings.ws_connections_per_ip:
                self._fatal(conn, m.TOO_MANY_CONNECTIONS)
            else:
                self._per_address[address] += 1
                self.connections.add(conn)
                conn.counted = True
            detached = await self._read(conn, ws, ws.path_params["room_id"])
        finally:
            if not detached:
                self._release(conn)
                await conn.stop_writer()

    def _release(self, conn: Connection) -> None:
        """The connection is gone: out of its room, out of the counts (once)."""
        if conn.lane is not None:
            conn.lane.set_handler(None)
        if not self._hold(conn):
            self._leave(conn)
        if conn.counted:
            conn.counted = False
            self.connections.discard(conn)
            self._per_address[conn.address] -= 1
            if self._per_address[conn.address] <= 0:
                del self._per_address[conn.address]
            if self.closing and not self.connections:
                self._all_gone.set()

    def _lost(self, conn: Connection) -> None:
        """A detached connection is gone (the protocol says so)."""
        if conn.lane is not None:
            conn.farewell = conn.lane.closed_cleanly()
        self._release(conn)
        conn.cancel_writer()

    async def _read(self, conn: Connection, ws: WebSocket, room_id: str) -> bool:
        """Read frames until the client disconnects (which also follows any close we send);
        True instead if the peer has joined and its lane took over (see wsserver.Lane)."""
        loop = asyncio.get_running_loop()
        join_deadline = loop.time() + self.settings.ws_join_timeout
        while True:
            lane = conn.lane
            if (
                lane is not None
                and conn.peer_id is not None
                and not conn.dead
                and lane.detach(functools.partial(self._lost, conn))
            ):
                conn.detached, conn.ws = True, None
                # A joined peer needs no task: an idle one costs a few KB less (bench/README.md).
                return True
            try:
                if conn.peer_id is not None or conn.dead:
                    message = await ws.receive()
                else:
                    async with asyncio.timeout_at(join_deadline):
                        message = await ws.receive()
            except TimeoutError:
                self._fatal(conn, m.JOIN_TIMEOUT)
                continue
            if message["type"] == "websocket.disconnect":
                conn.farewell = message.get("code", CLOSE_LOST) != CLOSE_LOST
                return False
            if conn.dead:
                continue
            try:
                join = self._on_frame(conn, room_id, message.get("text"), message.get("bytes"))
                if join is not None:
                    await join
                    join = None  # a finished coroutine still holds its frame's memory
            except StoreUnavailable:  # Redis away (--redis): not a fault, the client retries
                self._join_failed(conn, m.UNAVAILABLE)
            except Exception:  # a fault of ours (say, the database): close this peer cleanly
                self._fault(conn)

    def _on_lane_frame(self, conn: Connection, text: str | None, data: bytes | None) -> None:
        """A frame of a joined peer, straight from the protocol (no task in between)."""
        if conn.dead or conn.room_id is None:
            return
        try:
            join = self._on_frame(conn, conn.room_id, text, data)
            assert join is None  # a joined peer's join is answered at once
        except Exception:
            self._fault(conn)

    def _fault(self, conn: Connection) -> None:
        log.exception("signaling fault")
        conn.close(m.CLOSE_INTERNAL_ERROR, "internal error")
        self._leave(conn)

    def _on_frame(
        self, conn: Connection, room_id: str, text: str | None, data: bytes | None
    ) -> Coroutine[Any, Any, None] | None:
        """Handle one frame; only a join has to wait for something, and is returned to await."""
        if text is not None:  # isascii() is O(1): most frames need no UTF-8 copy to be measured
            size = len(text) if text.isascii() else len(text.encode())
        else:
            size = len(data or b"")
        limit = self.settings.ws_max_message
        # time.monotonic, not the loop's time: asyncio.get_running_loop() makes a getpid()
        # system call on CPython 3.11, and this runs for every frame.
        if not conn.bucket.take(time.monotonic()):
            return self._refuse(conn, m.RATE_LIMITED)
        if size > limit:
            return self._refuse(conn, m.TOO_LARGE, f"message of {size} bytes, limit {limit}")
        if text is None:
            return self._refuse(conn, m.BAD_MESSAGE, "binary frames are not accepted")
        try:
            message = m.parse(text)
        except m.BadMessage as exc:
            return self._refuse(conn, m.BAD_MESSAGE, str(exc))
        kind = message["type"]
        self.counts[_MESSAGE_KEYS.get(kind, "messages.invalid")] += 1
        if kind == "signal":
            return self._signal(conn, message, text)
        if kind == "ping":
            return self._deliver(conn, {"type": "pong"})
        if kind == "join":
            if conn.peer_id is not None:
                return self._reject(conn, m.BAD_MESSAGE, "already joined")
            return self._join(conn, room_id, message)
        return self._reject(conn, m.BAD_MESSAGE, "unknown message type")

    # -- resuming (docs/api.md, resume) ------------------------------------------------------

    def _hold(self, conn: Connection) -> bool:
        """A joined peer's socket dropped without a goodbye: keep its place for a resume."""
        if (
            conn.token is None
            or conn.peer_id is None
            or conn.room_id is None
            or conn.dead
            or conn.farewell
            or self.closing
            or self.rooms.get(conn.room_id, {}).get(conn.peer_id) is not conn
        ):
            return False
        conn.hold()
        window = self.settings.resume_window
        conn.timer = asyncio.get_running_loop().call_later(window, self._drop_held, conn)
        if self.fleet is not None:
            self.fleet.hold_token(conn.token, window)
        log.debug("peer %s dropped: held %.0f s for a resume", conn.peer_id, window)
        return True

    def _drop_held(self, conn: Connection) -> None:
        """Nobody resumed in time: the peer is gone, as it would have been without resume."""
        conn.timer = None
        if conn.held and not conn.dead:
            conn.dead = True
            self._leave(conn)

    def _take_over(self, old: Connection) -> list[str]:
        """`old` is replaced by a resume: stop its wait or its socket; return its queue."""
        if old.timer is not None:
            old.timer.cancel()
            old.timer = None
        if old.token is not None:
            self.tokens.pop(old.token, None)
            old.token = None
        frames = old.take_queued() if old.held else []
        if not old.held:  # still connected as far as we know (its drop not yet seen)
            old.close(m.CLOSE_RESUMED, "resumed on another connection", flush=False)
        old.dead = True  # its end leaves nothing: its place is the new connection's now
        return frames

    async def _resume(self, conn: Connection, room: Room, token: str) -> None:
        old = self.tokens.get(token)
        if old is not None:
            peers = self.rooms.get(room.id, {})
            if old.room_id != room.id or old.peer_id is None or peers.get(old.peer_id) is not old:
                return self._join_failed(conn, m.RESUME_REFUSED)  # another room's: not used up
            frames = self._take_over(old)
            peers[old.peer_id] = conn
            listed = [p for p in peers if p != old.peer_id] + list(self.remote.get(room.id, {}))
            return await self._welcome(conn, room, old.peer_id, [], listed, frames)
        if self.fleet is None:
            return self._join_failed(conn, m.RESUME_REFUSED)
        await self._resume_elsewhere(conn, room, token, self.fleet)

    async def _resume_elsewhere(
        self, conn: Connection, room: Room, token: str, fleet: Fleet
    ) -> None:
        """The token is another instance's: that instance hands the peer over (fleet.py)."""
        claimed = await fleet.claim_token(token, room.id)
        if claimed is None or claimed[1] == fleet.id:
            return self._join_failed(conn, m.RESUME_REFUSED)
        peer_id, instance = claimed
        frames = await fleet.handover(instance, room.id, peer_id)
        if frames is None:  # gone meanwhile, or no answer in time: a late hand-over there would
            # drop the peer without a leave, so its place must not outlive this refusal
            fleet.leave(room.id, peer_id, instance)
            return self._join_failed(conn, m.RESUME_REFUSED)
        members = await fleet.move(room.id, peer_id, instance)
        if conn.dead or self.closing:  # gone while we waited: now it leaves for real
            return fleet.leave(room.id, peer_id)
        peers = self.rooms.get(room.id)
        if peers is None:
            peers = self.rooms[room.id] = {}
            self.remote[room.id] = {p: i for p, i in members.items() if i != fleet.id}
        self.remote.get(room.id, {}).pop(peer_id, None)  # it is here now: nobody is told
        peers[peer_id] = conn
        listed = [p for p in peers if p != peer_id] + list(self.remote.get(room.id, {}))
        await self._welcome(conn, room, peer_id, [], listed, frames)

    def _give_away(self, room_id: str, peer_id: str, requester: str) -> list[str] | None:
        """Another instance resumes our peer: hand it over, with what was queued for it."""
        peers = self.rooms.get(room_id)
        old = peers.get(peer_id) if peers else None
        if peers is None or old is None or old.dead:
            return None
        frames = self._take_over(old)
        del peers[peer_id]
        # Signals already on their way here follow it for a while (sweep prunes the table).
        self._moved[f"{room_id}|{peer_id}"] = (requester, time.monotonic() + MOVED_FOR)
        if peers:  # our other peers know it already: it is only elsewhere now
            self.remote.setdefault(room_id, {})[peer_id] = requester
        else:
            del self.rooms[room_id]
            self.remote.pop(room_id, None)
        return frames

    # -- joining -----------------------------------------------------------------------------

    async def _check_pin(self, conn: Connection, room: Room, pin: str) -> m.ErrorCode | None:
        # Each attempt counts before its check, so parallel guesses (here or on other instances
        # sharing the store) cannot overshoot the limit; a right PIN gives its attempts back.
        room_ticket, _ = await self._room_failures.acquire(room.id)
        if room_ticket is None:
            self.counts["pin_lockouts.room"] += 1
            return m.TOO_MANY_ATTEMPTS
        address_ticket, _ = await self._address_failures.acquire(conn.address)
        if address_ticket is None:
            self.counts["pin_lockouts.address"] += 1
            await self._room_failures.release(room.id, room_ticket)
            return m.TOO_MANY_ATTEMPTS
        if not await self._store().verify_pin(room, pin):
            return m.WRONG_PIN
        await self._room_failures.release(room.id, room_ticket)
        await self._address_failures.release(conn.address, address_ticket)
        return None

    async def _join(self, conn: Connection, room_id: str, message: dict[str, Any]) -> None:
        pin = message.get("pin")
        if pin is not None and not isinstance(pin, str):
            return self._reject(conn, m.BAD_MESSAGE, '"pin" must be a string')
        resume = message.get("resume")
        if resume is not None and not isinstance(resume, str):
            return self._reject(conn, m.BAD_MESSAGE, '"resume" must be a string')
        room = await self._store().get(room_id, time.time())
        if room is None:
            return self._join_failed(conn, m.ROOM_NOT_FOUND)
        if resume is not None:  # the token stands for the PIN it was given after
            if conn.dead or self.closing:
                return None
            return await self._resume(conn, room, resume)
        if room.has_pin:
            if not pin:
                return self._join_failed(conn, m.PIN_REQUIRED)
            failure = await self._check_pin(conn, room, pin)
            if failure is not None:
                return self._join_failed(conn, failure)
        if conn.dead or self.closing:
            return
        peer_id = secrets.token_urlsafe(9)
        if self.fleet is not None:
            return await self._join_fleet(conn, room, peer_id, self.fleet)
        # No await from here until the peer is in the room: the capacity check cannot race.
        peers = self.rooms.setdefault(room.id, {})
        if len(peers) >= room.max_peers:
            return self._join_failed(conn, m.ROOM_FULL)
        others = list(peers.values())
        peers[peer_id] = conn
        await self._welcome(conn, room, peer_id, others, [other.peer_id for other in others])

    async def _join_fleet(self, conn: Connection, room: Room, peer_id: str, fleet: Fleet) -> None:
        """Join through Redis: the room's size counts its peers on every instance."""
        members = await fleet.join(room.id, peer_id, room.max_peers)
        if members is None:
            return self._join_failed(conn, m.ROOM_FULL)
        if conn.dead or self.closing:  # gone while we waited
            return fleet.leave(room.id, peer_id)
        peers = self.rooms.get(room.id)
        if peers is None:  # the first here: what Redis said is all we know of the others
            peers = self.rooms[room.id] = {}
            self.remote[room.id] = {p: i for p, i in members.items() if i != fleet.id}
        # Else the inbox keeps self.remote current: j and l come in the order Redis ran them.
        others = list(peers.values())
        peers[peer_id] = conn
        await self._welcome(conn, room, peer_id, others, list(members))

    async def _welcome(
        self,
        conn: Connection,
        room: Room,
        peer_id: str,
        others: list[Connection],
        listed: list[str],
        resumed: list[str] | None = None,
    ) -> None:
        """The peer is in the room: welcome it, tell the others here (peer-joined), or, when
        it resumed, nobody, and give it what was queued for it meanwhile."""
        conn.peer_id, conn.room_id = peer_id, room.id
        conn.token = token = secrets.token_urlsafe(18)
        self.tokens[token] = conn
        if self.fleet is not None:
            self.fleet.save_token(token, room.id, peer_id)
        log.debug("peer %s joined room %s.. (%d here)", peer_id, room.id[:6], len(others) + 1)
        welcome = {
            "type": "welcome",
            "peerId": peer_id,
            "peers": listed,
            "iceServers": ice_servers(
                self.settings, self._ice_host(conn), self.secret, peer_id, time.time()
            ),
            # A private room's peers gather relay candidates only (docs/web.md, private rooms).
            "iceTransportPolicy": "relay" if room.private else "all",
            "resume": token,  # rejoin with it within --resume-window (docs/api.md)
        }
        if resumed is not None:
            welcome["resumed"] = True
        self._deliver(conn, welcome)
        if resumed is None:
            self._broadcast(others, {"type": "peer-joined", "peerId": peer_id})
        for frame in resumed or ():
            self._deliver(conn, frame)
        if conn.lane is not None and not conn.dead:
            conn.lane.set_handler(functools.partial(self._on_lane_frame, conn))
        await self._store().touch([room.id], time.time())

    def _ice_host(self, conn: Connection) -> str:
        if self._public_host is not None:
            return self._public_host
        ws = conn.ws
        assert ws is not None  # joining: not detached yet
        host = host_from_header(ws.headers.get("host", ""))
        if host is None:  # no usable Host header: the address the client reached us on
            server = ws.scope.get("server")
            host = url_host(server[0]) if server else None
        return host or "localhost"

    # -- relaying ----------------------------------------------------------------------------

    def _signal(self, conn: Connection, message: dict[str, Any], text: str | None = None) -> None:
        if conn.peer_id is None or conn.room_id is None:
            return self._reject(conn, m.BAD_MESSAGE, "join first")
        to = message.get("to")
        if not isinstance(to, str):
            return self._reject(conn, m.BAD_MESSAGE, '"to" must be a peer id')
        if "data" not in message:
            return self._reject(conn, m.BAD_MESSAGE, 'missing "data"')
        target = self.rooms.get(conn.room_id, _NOBODY).get(to)
        if target is None or target is conn:
            if target is None and self.fleet is not None:  # on another instance, perhaps
                return self._signal_remote(conn, message, text, to, self.fleet)
            return self._reject(conn, m.UNKNOWN_PEER)
        relayed = self._relayed(conn, message, text)
        if relayed is not None:
            self._deliver(target, relayed)

    def _relayed(self, conn: Connection, message: dict[str, Any], text: str | None) -> str | None:
        """The signal as its addressee gets it; None (and the sender told) if it cannot be."""
        assert conn.peer_id is not None
        try:  # json.dumps recurses deeper than json.loads did: data parsed may not encode
            data_text = m.signal_data_text(text, message) if text is not None else None
            return m.encode_signal(conn.peer_id, message["data"], data_text)
        except RecursionError:
            self._reject(conn, m.BAD_MESSAGE, "nested too deeply")
            return None

    def _signal_remote(
        self, conn: Connection, message: dict[str, Any], text: str | None, to: str, fleet: Fleet
    ) -> None:
        """A signal for a peer of this room on another instance: to that instance's inbox."""
        assert conn.peer_id is not None and conn.room_id is not None
        instance = self.remote.get(conn.room_id, _NOBODY).get(to)
        if instance is None:
            return self._reject(conn, m.UNKNOWN_PEER)
        relayed = self._relayed(conn, message, text)
        if relayed is None:
            return None
        if not fleet.send(instance, conn.room_id, to, relayed):
            now = time.monotonic()  # lost: counted by the fleet, logged once a minute at most
            if now - self._fleet_drop_logged >= 60.0:
                self._fleet_drop_logged = now
                log.warning("%d signal(s) to other instances dropped so far", fleet.dropped)

    # -- the fleet (--redis): messages from other instances -----------------------------------

    async def resync_fleet(self) -> int:
        """Redis is back after an outage: put our peers back in their rooms there and learn
        who else is in them, telling our peers of every change (fleet.py); our peer count."""
        assert self.fleet is not None
        local = {room_id: list(peers) for room_id, peers in self.rooms.items()}
        members = await self.fleet.sync(local)
        for room_id, listed in members.items():
            peers = self.rooms.get(room_id)
            if not peers:  # left meanwhile
                continue
            now = {p: i for p, i in listed.items() if i != self.fleet.id}
            before = self.remote.get(room_id, {})
            self.remote[room_id] = now
            conns = list(peers.values())
            for peer_id in before.keys() - now.keys():
                self._broadcast(conns, {"type": "peer-left", "peerId": peer_id})
            for peer_id in now.keys() - before.keys():
                self._broadcast(conns, {"type": "peer-joined", "peerId": peer_id})
        return sum(len(peers) for peers in local.values())

    def on_fleet_message(self, text: str) -> None:
        """A message from our inbox (fleet.py has the format)."""
        kind, _, rest = text.partition("|")
        if kind == "s":
            room_id, to, frame = rest.split("|", 2)
            target = self.rooms.get(room_id, _NOBODY).get(to)
            if target is not None:
                self._deliver(target, frame)
            elif self.fleet is not None:  # resumed elsewhere just now: after it (else it left)
                moved = self._moved.get(f"{room_id}|{to}")
                if moved is not None and moved[1] > time.monotonic():
                    self.fleet.send(moved[0], room_id, to, frame)
        elif kind == "j":
            room_id, peer_id, instance = rest.split("|")
            peers = self.rooms.get(room_id)
            remote = self.remote.setdefault(room_id, {}) if peers else None
            if peers and remote is not None and remote.get(peer_id) != instance:
                known = peer_id in remote  # moved instances: the others knew it already
                remote[peer_id] = instance
                if not known:
                    self._broadcast(
                        list(peers.values()), {"type": "peer-joined", "peerId": peer_id}
                    )
        elif kind == "r":  # another instance resumes one of our peers
            request, room_id, peer_id, requester = rest.split("|")
            assert self.fleet is not None
            self.fleet.reply(requester, request, self._give_away(room_id, peer_id, requester))
        elif kind == "h":
            assert self.fleet is not None
            self.fleet.settle(rest)
        elif kind == "l":
            room_id, peer_id = rest.split("|")
            remote = self.remote.get(room_id)
            peers = self.rooms.get(room_id)
            if remote is not None and remote.pop(peer_id, None) is not None and peers:
                self._broadcast(list(peers.values()), {"type": "peer-left", "peerId": peer_id})

    def _broadcast(self, conns: list[Connection], message: dict[str, Any]) -> None:
        text = m.encode(message)  # once, not once per recipient
        for conn in conns:
            self._deliver(conn, text)

    def _deliver(self, conn: Connection, message: dict[str, Any] | str) -> None:
        if not conn.send(message):
            self._fatal(conn, m.TOO_SLOW, flush=False)

    def _refuse(self, conn: Connection, code: m.ErrorCode, detail: str | None = None) -> None:
        """A frame refused before it could be read as a message: counted as invalid."""
        self.counts["messages.invalid"] += 1
        self._reject(conn, code, detail)

    def _join_failed(self, conn: Connection, code: m.ErrorCode) -> None:
        self.counts[f"join_failures.{code.code}"] += 1
        self._fatal(conn, code)

    def _reject(self, conn: Connection, code: m.ErrorCode, detail: str | None = None) -> None:
        """Answer a non-fatal error; a peer that keeps causing them is closed."""
        self._deliver(conn, m.error(code, detail))
        now = asyncio.get_running_loop().time()
        conn.errors.hit("", now)
        if not conn.errors.allowed("", now):
            self._fatal(conn, m.TOO_MANY_ERRORS)

    def _fatal(self, conn: Connection, code: m.ErrorCode, *, flush: bool = True) -> None:
        assert code.close is not None
        conn.close(code.close, code.code, error=code, flush=flush)
        self._leave(conn)

    def _leave(self, conn: Connection) -> None:
        if conn.peer_id is None or conn.room_id is None:
            return
        peers = self.rooms.get(conn.room_id)
        if peers is None or peers.get(conn.peer_id) is not conn:
            return
        del peers[conn.peer_id]
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        if conn.token is not None:
            self.tokens.pop(conn.token, None)
            if self.fleet is not None:
                self.fleet.forget_token(conn.token)
            conn.token = None
        if self.fleet is not None:  # the others, wherever they are, hear it from Redis
            self.fleet.leave(conn.room_id, conn.peer_id)
        if not peers:
            del self.rooms[conn.room_id]
            self.remote.pop(conn.room_id, None)
        elif not self.closing:
            self._broadcast(list(peers.values()), {"type": "peer-left", "peerId": conn.peer_id})

    def _store(self) -> RoomCache:
        if self.store is None:
            raise RuntimeError("room store not open (lifespan not started)")
        return self.store
