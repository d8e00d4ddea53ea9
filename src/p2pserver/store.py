"""The room store interface: what RoomCache, the hub and the HTTP API need from a back end.

Two back ends implement it: SQLite (rooms.RoomStore, one process, the default) and Redis
(redisstore.RedisRoomStore, `--redis URL`, shared by every instance pointed at it). Besides the
rooms, a store keeps the rate limits that must hold for everyone it serves: create-chat per
address and wrong PINs per room and per address (docs/architecture.md). With SQLite those stay
in this process's memory, as one process is all that uses the file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from p2pserver.config import Settings
from p2pserver.ratelimit import Ticket
from p2pserver.rooms import Room


class StoreUnavailable(Exception):
    """The store cannot be reached for now (Redis lost): answered 503 or `unavailable`, not a
    fault of ours; the back end reconnects by itself (docs/deploy.md)."""


class Limiter(Protocol):
    """At most `limit` attempts per key in any `window` seconds, counted before each attempt."""

    async def acquire(self, key: str) -> tuple[Ticket | None, float]:
        """Count an attempt: (ticket, 0), or (None, seconds to wait) when over the limit."""
        ...

    async def release(self, key: str, ticket: Ticket) -> None:
        """The attempt did not count after all (a right PIN)."""
        ...

    def prune(self) -> None:
        """Forget keys whose attempts are all older than the window."""
        ...


class Store(Protocol):
    ttl: float
    # Rooms given out by create_room whose write then failed (SQLite with --db-sync normal,
    # docs/api.md#rooms), each told to on_lost; none where create_room waits for the write.
    lost: int
    on_lost: Callable[[str], None]

    async def close(self) -> None: ...

    async def ping(self) -> bool: ...

    async def create_room(
        self, *, with_pin: bool, max_peers: int, now: float, private: bool = False
    ) -> tuple[Room, str | None]: ...

    async def get(self, room_id: str, now: float) -> Room | None: ...

    async def verify_pin(self, room: Room, pin: str) -> bool: ...

    async def touch(self, room_ids: Iterable[str], now: float) -> None: ...

    async def sweep(self, now: float) -> int: ...

    async def count(self) -> int: ...

    async def turn_secret(self) -> str: ...

    def limiter(self, name: str, limit: int, window: float) -> Limiter: ...


async def open_store(settings: Settings) -> Store:
    """The back end the settings name: Redis with --redis, else the SQLite file --db."""
    if settings.redis:
        from p2pserver.redisstore import RedisRoomStore

        return await RedisRoomStore.open(settings.redis, settings.room_ttl)
    from p2pserver.rooms import RoomStore

    return await RoomStore.open(settings.db, settings.room_ttl, settings.db_sync)
