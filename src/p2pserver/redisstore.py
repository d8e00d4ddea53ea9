"""RedisRoomStore: the store interface (store.py) in Redis, shared by every instance using it.

Keys (all under PREFIX; docs/deploy.md):
  room:{id}       a hash (pin_hash, max_peers, created, last_active, private) that Redis itself
                  deletes `ttl` seconds after the room was last active (EXPIRE, refreshed by
                  every touch);
  rooms           a sorted set of room ids by last_active: count() and sweep() read it;
  limit:{name}:{key}  a sorted set of attempts by time, for one rate limit and key;
  meta:{key}      server metadata (the generated TURN secret).

Every write that reads first is one Lua script, so instances racing on one key cannot
interleave. Scripts name every key they touch, but room keys and the index are different keys:
one Redis server (or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import functools
import math
import secrets
from collections.abc import Awaitable, Callable, Iterable
from typing import ParamSpec, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from p2pserver.ratelimit import Ticket
from p2pserver.rooms import Room, RoomStore, is_room_id
from p2pserver.store import StoreUnavailable

PREFIX = "p2p:"
PING_TIMEOUT = 2.0  # seconds: /healthz must answer even when Redis does not
SWEEP_BATCH = 1000
MAX_CONNECTIONS = 32  # to Redis, per instance
POOL_TIMEOUT = 10.0  # seconds a command waits for a free connection

# KEYS: room, index. ARGV: pin_hash ("" for none), max_peers, now, private, ttl, id.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'pin_hash', ARGV[1], 'max_peers', ARGV[2], 'created', ARGV[3],
           'last_active', ARGV[3], 'private', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[6])
return 1
"""

# KEYS: room..., index. ARGV: now, ttl, id... (in the order of the room keys).
# Never moves last_active back: touches from several instances may arrive out of order.
_TOUCH = """
local index = KEYS[#KEYS]
local now = tonumber(ARGV[1])
for i = 1, #KEYS - 1 do
  local last = redis.call('HGET', KEYS[i], 'last_active')
  if last and tonumber(last) < now then
    redis.call('HSET', KEYS[i], 'last_active', ARGV[1])
    redis.call('EXPIRE', KEYS[i], ARGV[2])
    redis.call('ZADD', index, ARGV[1], ARGV[i + 2])
  end
end
return 0
"""

# KEYS: room..., index. ARGV: cutoff, id... Deletes the rooms still idle since cutoff (a touch
# may have come in since they were listed) and drops every listed id whose room is gone.
_SWEEP = """
local index = KEYS[#KEYS]
local cutoff = tonumber(ARGV[1])
local deleted = 0
for i = 1, #KEYS - 1 do
  local last = redis.call('HGET', KEYS[i], 'last_active')
  if not last or tonumber(last) <= cutoff then
    redis.call('DEL', KEYS[i])
    redis.call('ZREM', index, ARGV[i + 1])
    deleted = deleted + 1
  end
end
return deleted
"""

# KEYS: the limit's key. ARGV: window (microseconds), limit, ticket. Redis's own clock, so
# instances with skewed clocks count alike. Returns {1, 0} or {0, microseconds to wait}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, math.max(0, tonumber(oldest[2]) + window - now)}
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
return {1, 0}
"""


# What Redis being away looks like (a replica promoted meanwhile refuses writes: ReadOnly).
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError, TimeoutError)


P = ParamSpec("P")
T = TypeVar("T")


def unavailable_on_error(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Redis away: StoreUnavailable, which callers answer without a traceback."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except UNREACHABLE as exc:
            raise StoreUnavailable(str(exc) or type(exc).__name__) from exc

    return wrapper


def redacted(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisLimiter:
    """A Limiter (store.py) kept in Redis: the limit holds across every instance."""

    def __init__(self, client: aioredis.Redis, name: str, limit: int, window: float) -> None:
        self._client = client
        self._prefix = f"{PREFIX}limit:{name}:"
        self._limit = limit
        self._window_us = max(1, round(window * 1_000_000))
        self._acquire = client.register_script(_ACQUIRE)

    @unavailable_on_error
    async def acquire(self, key: str) -> tuple[Ticket | None, float]:
        ticket = secrets.token_hex(8)
        allowed, wait = await self._acquire(
            keys=[self._prefix + key], args=[self._window_us, self._limit, ticket]
        )
        return (ticket, 0.0) if allowed else (None, int(wait) / 1_000_000)

    @unavailable_on_error
    async def release(self, key: str, ticket: Ticket) -> None:
        await self._client.zrem(self._prefix + key, str(ticket))

    def prune(self) -> None:
        pass  # Redis drops a key's attempts itself (PEXPIRE) once they are all too old


class RedisRoomStore:
    lost = 0  # create_room answers once Redis has the room (store.py)

    def __init__(self, client: aioredis.Redis, ttl: float) -> None:
        self.on_lost: Callable[[str], None] = lambda room_id: None  # never called
        self._client = client
        self.ttl = ttl
        self._ttl_seconds = max(1, math.ceil(ttl))
        self._index = PREFIX + "rooms"
        self._create = client.register_script(_CREATE)
        self._touch = client.register_script(_TOUCH)
        self._sweep = client.register_script(_SWEEP)

    @classmethod
    async def open(cls, url: str, ttl: float) -> RedisRoomStore:
        """Connect and check that Redis answers; RedisError or OSError if it does not."""
        # Blocking: a burst of joins waits for one of MAX_CONNECTIONS instead of opening (or
        # failing for want of) a connection each.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=POOL_TIMEOUT,
            decode_responses=True,
            socket_connect_timeout=5,
            socket_timeout=10,
        )
        client = aioredis.Redis.from_pool(pool)
        try:
            await client.ping()
        except BaseException:
            await client.aclose()
            raise
        return cls(client, ttl)

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    async def close(self) -> None:
        await self._client.aclose()

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                return bool(await self._client.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    # The same on both back ends: new_room() with this store's _add.
    create_room = unavailable_on_error(RoomStore.create_room)
    verify_pin = RoomStore.verify_pin

    async def _add(self, room: Room) -> bool:
        """Store a new room with its expiry; False when its id is taken."""
        args = [room.pin_hash or "", room.max_peers, repr(room.created), int(room.private)]
        args += [self._ttl_seconds, room.id]
        return bool(await self._create(keys=[self._key(room.id), self._index], args=args))

    @unavailable_on_error
    async def get(self, room_id: str, now: float) -> Room | None:
        if not is_room_id(room_id):
            return None
        fields = await self._client.hgetall(self._key(room_id))
        if not fields:
            return None
        room = Room(
            room_id,
            fields["pin_hash"] or None,
            int(fields["max_peers"]),
            float(fields["created"]),
            float(fields["last_active"]),
            private=fields["private"] == "1",
        )
        # Expired by our clock but not yet by Redis's TTL: expired, as with SQLite.
        return room if room.last_active > now - self.ttl else None

    @unavailable_on_error
    async def touch(self, room_ids: Iterable[str], now: float) -> None:
        ids = list(room_ids)
        if ids:
            await self._touch(
                keys=[*map(self._key, ids), self._index], args=[repr(now), self._ttl_seconds, *ids]
            )

    @unavailable_on_error
    async def sweep(self, now: float) -> int:
        """Drop rooms idle past the TTL from the index (and their hashes, if Redis has not)."""
        cutoff = now - self.ttl
        deleted = 0
        while True:
            ids = await self._client.zrangebyscore(
                self._index, "-inf", cutoff, start=0, num=SWEEP_BATCH
            )
            if not ids:
                return deleted
            deleted += int(
                await self._sweep(
                    keys=[*map(self._key, ids), self._index], args=[repr(cutoff), *ids]
                )
            )
            if len(ids) < SWEEP_BATCH:
                return deleted

    @unavailable_on_error
    async def count(self) -> int:
        return int(await self._client.zcard(self._index))

    @unavailable_on_error
    async def meta_get_or_set(self, key: str, value: str) -> str:
        """meta[key], storing `value` first if absent (race-free across instances)."""
        await self._client.set(PREFIX + "meta:" + key, value, nx=True)
        stored = await self._client.get(PREFIX + "meta:" + key)
        assert stored is not None
        return str(stored)

    async def turn_secret(self) -> str:
        """Generated by the first instance; every instance then signs with it (docs/turn.md)."""
        return await self.meta_get_or_set("turn_secret", secrets.token_urlsafe(32))

    def limiter(self, name: str, limit: int, window: float) -> RedisLimiter:
        return RedisLimiter(self._client, name, limit, window)

    def _key(self, room_id: str) -> str:
        return f"{PREFIX}room:{room_id}"
