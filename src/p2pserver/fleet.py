"""Signaling across instances that share one Redis (`--redis`): who is in which room, on which
instance, and a way to reach that instance (docs/architecture.md, "A fleet").

Keys and channels (under redisstore.PREFIX):
  members:{room}      hash peer id -> instance id: every peer of the room, on any instance. The
                      join script checks its size against the room's limit and adds the peer
                      in one step, so joins racing on two instances cannot overfill a room.
  peers:{instance}    hash peer id -> room id: the peers an instance holds (for the reaper).
  instances           set of instance ids that may hold peers.
  alive:{instance}    a key with a TTL (presence_ttl), renewed every presence_ttl / 3.
  inbox:{instance}    the pub/sub channel an instance reads: one per instance, so a message
                      goes to the one instance that holds its addressee, not to all.

Inbox messages are text, fields split by "|" (room and peer ids are URL-safe base64, no "|"):
  s|room|to|frame     a relayed signal frame for local peer `to`
  j|room|peer|inst    `peer` joined `room` on instance `inst`
  l|room|peer         `peer` left `room`
  r|req|room|peer|inst  instance `inst` resumes our `peer`: hand it over (answer with h)
  h|req|ok|frames     the answer: 1 and the JSON list of frames queued for it, or 0
  resume:{token}      (a key) "room|peer|instance" of a resume token; used up by a resume
Joins and leaves publish their j and l messages from inside their scripts. Everything an
instance sends to Redis goes out in order, from one task, in pipelined batches: a peer's
signals reach the other instance in the order it sent them, and after its join.

An instance that dies without saying goodbye stops renewing alive:{instance}; within
presence_ttl every other instance sees the key gone and, every presence_ttl / 2, one of them
removes the dead instance's peers (a script, so only one does) and tells their rooms: peers
are reported left at most 1.5 * presence_ttl after the instance died (15 s by default).

Redis lost: joins here are refused (`unavailable`), signals for other instances are dropped,
peers on this instance go on as before. The inbox reader reconnects with backoff; once it is
subscribed again the instance renews its presence and resynchronises (sync()): its peers are
put back in their rooms' member hashes (an outage longer than presence_ttl may have had them
reaped), leaves that could not be sent are sent, and the hub is told each room's members.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from p2pserver.redisstore import PREFIX, UNREACHABLE, redacted
from p2pserver.store import StoreUnavailable

log = logging.getLogger("p2pserver.fleet")

HANDOVER_TIMEOUT = 5.0  # seconds a resume waits for the other instance to hand its peer over
TOKEN_TTL = 24 * 3600  # a resume token's record while its peer is connected (renewed on resume)
MAX_PENDING = 50_000  # messages waiting for Redis; past it, signals to other instances drop
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 5.0  # seconds between reconnection attempts, doubling
READ_WAIT = 1.0  # seconds the inbox reader waits for a message before it looks at `up`
INBOX = PREFIX + "inbox:"

# Scripts that tell other instances define this first: send `message` to the inbox of each
# instance among a room's members (HGETALL's flat peer, instance list) but `me`, once each.
_TELL = """
local function tell(members, me, inbox, message)
  local told = {}
  for i = 2, #members, 2 do
    local inst = members[i]
    if inst ~= me and not told[inst] then
      told[inst] = true
      redis.call('PUBLISH', inbox .. inst, message)
    end
  end
end
"""


def _with_tell(body: str) -> str:
    return _TELL + body


# KEYS: members:{room}, peers:{instance}. ARGV: peer, instance, max peers, room, inbox prefix.
# Returns {0} when the room is full, else {1, peer, instance, ...} (the members before).
_JOIN = _with_tell("""
local members = redis.call('HGETALL', KEYS[1])
if #members / 2 >= tonumber(ARGV[3]) then return {0} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
tell(members, ARGV[2], ARGV[5], 'j|' .. ARGV[4] .. '|' .. ARGV[1] .. '|' .. ARGV[2])
table.insert(members, 1, 1)
return members
""")

# KEYS: members:{room}, peers:{instance}. ARGV: peer, instance, room, inbox prefix.
_LEAVE = _with_tell("""
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
local members = redis.call('HGETALL', KEYS[1])
tell(members, ARGV[2], ARGV[4], 'l|' .. ARGV[3] .. '|' .. ARGV[1])
return 1
""")

# KEYS: members:{room}, peers:{instance}. ARGV: peer, instance, room, inbox prefix. After an
# outage: put a peer that is still here back (no size check: it was let in already).
_REJOIN = _with_tell("""
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return 0 end
local members = redis.call('HGETALL', KEYS[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
tell(members, ARGV[2], ARGV[4], 'j|' .. ARGV[3] .. '|' .. ARGV[1] .. '|' .. ARGV[2])
return 1
""")

# KEYS: resume:{token}. ARGV: room. The token's "room|peer|instance", used up, if it is for
# this room; a token shown for another room stays as it was.
_CLAIM = """
local record = redis.call('GET', KEYS[1])
if not record then return false end
if string.sub(record, 1, #ARGV[1] + 1) ~= ARGV[1] .. '|' then return false end
redis.call('DEL', KEYS[1])
return record
"""

# KEYS: members:{room}, peers:{from}, peers:{to}. ARGV: peer, from, to, room, inbox prefix.
# A resumed peer moves to instance `to`; the others learn where it is (a j for a peer they
# know tells nobody). Returns the members after, flat.
_MOVE = _with_tell("""
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
local members = redis.call('HGETALL', KEYS[1])
tell(members, ARGV[3], ARGV[5], 'j|' .. ARGV[4] .. '|' .. ARGV[1] .. '|' .. ARGV[3])
return members
""")

# KEYS: peers:{dead}, instances, alive:{dead}. ARGV: dead instance, key prefix, inbox prefix.
# The room keys are built inside (one Redis, not Cluster: see redisstore.py).
_REAP = _with_tell("""
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local peers = redis.call('HGETALL', KEYS[1])
for i = 1, #peers, 2 do
  local peer, room = peers[i], peers[i + 1]
  local key = ARGV[2] .. 'members:' .. room
  if redis.call('HGET', key, peer) == ARGV[1] then
    redis.call('HDEL', key, peer)
    tell(redis.call('HGETALL', key), ARGV[1], ARGV[3], 'l|' .. room .. '|' .. peer)
  end
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return #peers / 2
""")


class _Op:
    """One command for the writer, and who waits for its answer (if anyone)."""

    __slots__ = ("args", "future")

    def __init__(self, args: tuple[Any, ...], future: asyncio.Future[Any] | None) -> None:
        self.args = args
        self.future = future


Resync = Callable[[], Awaitable[int]]


class Fleet:
    """This instance's membership of the fleet: its inbox, its presence, its peers' rooms."""

    def __init__(
        self,
        client: aioredis.Redis,
        on_message: Callable[[str], None],
        presence_ttl: float = 10.0,
        url: str = "",
    ) -> None:
        self.id = secrets.token_urlsafe(9)
        self._client = client
        self._on_message = on_message
        self.on_resync: Resync | None = None  # the hub's: after a reconnection (signaling.py)
        self.presence_ttl = presence_ttl
        self._where = redacted(url) if url else "Redis"
        self._inbox = INBOX + self.id
        self._alive = f"{PREFIX}alive:{self.id}"
        self._peers = f"{PREFIX}peers:{self.id}"
        self._instances = PREFIX + "instances"
        self._pending: list[_Op] = []
        self._writer: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pubsub: Any = None
        self.up = False  # subscribed and in sync; False while Redis is away
        self._down_since = 0.0
        self.dropped = 0  # signals for other instances dropped (backlog, or Redis away)
        self._handovers: dict[str, asyncio.Future[list[str] | None]] = {}

    # -- life --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe and announce; RedisError or OSError if Redis does not answer."""
        await self._connect()
        self.up = True
        self._tasks = [
            asyncio.create_task(self._supervise()),
            asyncio.create_task(self._keep_alive()),
        ]

    async def stop(self) -> None:
        """Say goodbye: send what is queued (the leaves of our peers), then leave the fleet."""
        await self.flush()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await task
        if self.up:
            with contextlib.suppress(RedisError, OSError):
                # Peers still listed (none, normally): reaped now rather than after presence_ttl.
                await self._client.delete(self._alive)
                await self._client.eval(
                    _REAP, 3, self._peers, self._instances, self._alive, self.id, PREFIX, INBOX
                )
        await self._close_pubsub()

    async def flush(self) -> None:
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    # -- what the hub asks -------------------------------------------------------------------

    async def join(self, room_id: str, peer_id: str, max_peers: int) -> dict[str, str] | None:
        """Add the peer to the room if it has room: the members before it (peer -> instance),
        or None when the room is full. StoreUnavailable while Redis is away."""
        if not self.up:
            raise StoreUnavailable("Redis is away")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        args = (f"{PREFIX}members:{room_id}", self._peers, peer_id, self.id, max_peers, room_id)
        self._queue(_Op(("EVAL", _JOIN, 2, *args, INBOX), future))
        try:
            reply = await future
        except UNREACHABLE as exc:
            raise StoreUnavailable(str(exc)) from exc
        if not reply or int(reply[0]) == 0:
            return None
        flat = reply[1:]
        return dict(zip(flat[0::2], flat[1::2], strict=True))

    def leave(self, room_id: str, peer_id: str, instance: str | None = None) -> None:
        """The peer leaves the room. It is ours unless `instance` says whose (a hand-over that
        did not answer: see Hub._resume_elsewhere); _LEAVE removes it only if it is still
        that instance's."""
        instance = instance or self.id
        if self.up:  # else sync() sends ours once Redis is back
            keys = (f"{PREFIX}members:{room_id}", f"{PREFIX}peers:{instance}")
            self._queue(_Op(("EVAL", _LEAVE, 2, *keys, peer_id, instance, room_id, INBOX), None))

    def send(self, instance: str, room_id: str, to: str, frame: str) -> bool:
        """Relay a signal frame to peer `to` on `instance`; False if it cannot go (dropped)."""
        if not self.up or len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            return False
        self._queue(_Op(("PUBLISH", INBOX + instance, f"s|{room_id}|{to}|{frame}"), None))
        return True

    # -- resume tokens and handovers (docs/api.md, resume) ------------------------------------

    def _token_key(self, token: str) -> str:
        return f"{PREFIX}resume:{token}"

    def save_token(self, token: str, room_id: str, peer_id: str) -> None:
        if self.up:
            record = f"{room_id}|{peer_id}|{self.id}"
            self._queue(_Op(("SET", self._token_key(token), record, "EX", TOKEN_TTL), None))

    def hold_token(self, token: str, window: float) -> None:
        """Its peer dropped: the token lasts the resume window (and a little slack) only."""
        if self.up:
            self._queue(_Op(("EXPIRE", self._token_key(token), int(window) + 5), None))

    def forget_token(self, token: str) -> None:
        if self.up:
            self._queue(_Op(("DEL", self._token_key(token)), None))

    async def claim_token(self, token: str, room_id: str) -> tuple[str, str] | None:
        """Use the token up: (peer, instance holding it), or None if it is not for this room
        (or unknown, used, expired)."""
        if not self.up:
            raise StoreUnavailable("Redis is away")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue(_Op(("EVAL", _CLAIM, 1, self._token_key(token), room_id), future))
        try:
            record = await future
        except UNREACHABLE as exc:
            raise StoreUnavailable(str(exc)) from exc
        if not record:
            return None
        _, peer_id, instance = str(record).split("|")
        return peer_id, instance

    async def handover(self, instance: str, room_id: str, peer_id: str) -> list[str] | None:
        """Ask `instance` for its peer: what was queued for it, or None if it has it no more."""
        request = secrets.token_hex(8)
        future: asyncio.Future[list[str] | None] = asyncio.get_running_loop().create_future()
        self._handovers[request] = future
        message = f"r|{request}|{room_id}|{peer_id}|{self.id}"
        self._queue(_Op(("PUBLISH", INBOX + instance, message), None))
        try:
            return await asyncio.wait_for(future, HANDOVER_TIMEOUT)
        except TimeoutError:
            return None
        finally:
            self._handovers.pop(request, None)

    def reply(self, requester: str, request: str, frames: list[str] | None) -> None:
        """Answer a handover: h|request|1|[frames...] or h|request|0|."""
        body = "0|" if frames is None else "1|" + json.dumps(frames)
        self._queue(_Op(("PUBLISH", INBOX + requester, f"h|{request}|{body}"), None))

    def settle(self, rest: str) -> None:
        request, ok, body = rest.split("|", 2)
        future = self._handovers.get(request)
        if future is not None and not future.done():
            frames = json.loads(body) if ok == "1" else None
            future.set_result(frames if isinstance(frames, list) else None)

    async def move(self, room_id: str, peer_id: str, instance: str) -> dict[str, str]:
        """The peer handed over by `instance` is ours now; the room's members after."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        keys = (f"{PREFIX}members:{room_id}", f"{PREFIX}peers:{instance}", self._peers)
        args = (peer_id, instance, self.id, room_id, INBOX)
        self._queue(_Op(("EVAL", _MOVE, 3, *keys, *args), future))
        try:
            flat = await future
        except UNREACHABLE as exc:
            raise StoreUnavailable(str(exc)) from exc
        return dict(zip(flat[0::2], flat[1::2], strict=True))

    async def sync(self, local: dict[str, list[str]]) -> dict[str, dict[str, str]]:
        """After an outage: make Redis say what is true here (`local`: room -> our peers
        there), and return the members of those rooms (peer -> instance)."""
        ours = await self._client.hgetall(self._peers)
        here = {(room, peer) for room, peers in local.items() for peer in peers}
        pipe = self._client.pipeline(transaction=False)
        for peer, room in ours.items():
            if (room, peer) not in here:  # left while Redis was away
                keys = (f"{PREFIX}members:{room}", self._peers)
                pipe.eval(_LEAVE, 2, *keys, peer, self.id, room, INBOX)
        for room, peer in here:
            keys = (f"{PREFIX}members:{room}", self._peers)
            pipe.eval(_REJOIN, 2, *keys, peer, self.id, room, INBOX)
        rooms = list(local)
        for room in rooms:
            pipe.hgetall(f"{PREFIX}members:{room}")
        replies = await pipe.execute()
        return dict(zip(rooms, replies[len(replies) - len(rooms) :], strict=True))

    # -- internals ---------------------------------------------------------------------------

    def _queue(self, op: _Op) -> None:
        self._pending.append(op)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        """The one writer: what piled up goes out as one pipeline, in order."""
        while self._pending:
            batch, self._pending = self._pending, []
            pipe = self._client.pipeline(transaction=False)
            for op in batch:
                pipe.execute_command(*op.args)
            try:
                replies: list[Any] = await pipe.execute(raise_on_error=False)
            except UNREACHABLE as exc:  # lost with Redis; _supervise says so, once
                replies = [exc] * len(batch)
                self._lost(exc)
            for op, reply in zip(batch, replies, strict=True):
                if op.future is None or op.future.done():
                    continue
                if isinstance(reply, BaseException):
                    op.future.set_exception(reply)
                else:
                    op.future.set_result(reply)

    async def _connect(self) -> None:
        await self._close_pubsub()
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(self._inbox)
        await self._announce()

    async def _close_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()

    def _lost(self, error: BaseException) -> None:
        """Redis is away (a command or the inbox failed): say so once, until it is back. The
        inbox reader sees `up` turn false within READ_WAIT and reconnects."""
        if self.up:
            self.up = False
            self._down_since = time.monotonic()
            log.warning(
                "Redis at %s lost (%s): signaling across instances paused, new joins refused; "
                "reconnecting",
                self._where,
                error,
            )

    async def _supervise(self) -> None:
        """Read the inbox; when Redis goes away, reconnect with backoff, resubscribe, resync."""
        while True:
            try:
                await self._read_inbox()
            except UNREACHABLE as exc:
                self._lost(exc)
            await self._reconnect()

    async def _reconnect(self) -> None:
        delay = BACKOFF_FIRST
        while True:
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(BACKOFF_MAX, delay * 2)
            try:
                await self._connect()
                peers = await self.on_resync() if self.on_resync is not None else 0
            except UNREACHABLE:
                continue  # still away: said once already
            except Exception:  # a fault of ours: said, and tried again
                log.exception("resynchronising with Redis failed")
                continue
            self.up = True
            log.warning(
                "Redis at %s is back after %.1f s: resubscribed, %d peer(s) resynchronised",
                self._where,
                time.monotonic() - self._down_since,
                peers,
            )
            return

    async def _read_inbox(self) -> None:
        pubsub = self._pubsub
        if pubsub is None:
            raise RedisConnectionError("not subscribed")
        while self.up:
            message = await pubsub.get_message(timeout=READ_WAIT)
            if message is None or message["type"] != "message":
                continue
            try:
                self._on_message(message["data"])
            except Exception:  # one bad message costs that message only
                log.exception("fleet message failed")
        raise RedisConnectionError("a command to Redis failed")

    async def _announce(self) -> None:
        pipe = self._client.pipeline(transaction=False)
        pipe.set(self._alive, "1", px=max(1, round(self.presence_ttl * 1000)))
        pipe.sadd(self._instances, self.id)
        await pipe.execute()

    async def _keep_alive(self) -> None:
        """Renew our presence; now and then, reap instances whose presence has run out."""
        loop = asyncio.get_running_loop()
        next_reap = loop.time()
        while True:
            await asyncio.sleep(self.presence_ttl / 3)
            if not self.up:
                continue  # the supervisor announces us again when Redis is back
            try:
                await self._announce()
                if loop.time() >= next_reap:
                    next_reap = loop.time() + self.presence_ttl / 2
                    await self._reap()
            except UNREACHABLE as exc:
                self._lost(exc)

    async def _reap(self) -> None:
        for other in await self._client.smembers(self._instances):
            if other == self.id or await self._client.exists(f"{PREFIX}alive:{other}"):
                continue
            keys = (f"{PREFIX}peers:{other}", self._instances, f"{PREFIX}alive:{other}")
            reaped = await self._client.eval(_REAP, 3, *keys, other, PREFIX, INBOX)
            if int(reaped) >= 0:
                log.warning("instance %s is gone: %d of its peers reported left", other, reaped)
