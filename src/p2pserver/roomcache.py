"""Rooms as the hub and the HTTP API use them: a read-through cache in front of a room store.

Rooms are tiny and read-mostly: a room is written once (create), read by every join and
check-chat, and only its last_active changes afterwards. So joins are answered from memory and
touches are batched: they go to the store from one writer task, as many rooms per write as
piled up while the previous write ran. The cache knows nothing of the store's back end (SQLite
or Redis): it uses the store interface of store.py only.

Several processes may share one store: an entry is re-read after MAX_AGE seconds, so a change
made elsewhere (a room swept as expired) is seen within that time, and a room that looks
expired here is always re-read before it is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterable
from typing import Any

from p2pserver.rooms import CLOSE_FLUSH_TIMEOUT, Room, is_room_id
from p2pserver.store import Limiter, Store, StoreUnavailable

log = logging.getLogger("p2pserver.rooms")

MAX_ENTRIES = 100_000  # a Room is a few hundred bytes
MAX_AGE = 30.0  # seconds before an entry is read from the store again
# A touch this close to the activity the store already has is not written: rooms expire on a
# sweep every TTL/10, so a clock this much behind changes nothing anyone sees, and a room's
# first join, right after its create, costs no write.
TOUCH_SLACK_MAX = 30.0
TOUCH_SLACK_SHARE = 0.01  # of the TTL


class RoomCache:
    def __init__(
        self, store: Store, *, max_entries: int = MAX_ENTRIES, max_age: float = MAX_AGE
    ) -> None:
        self.store = store
        self.max_entries = max_entries
        self.max_age = max_age
        self._rooms: dict[str, tuple[Room, float]] = {}  # id -> (room, when read), oldest first
        self._touches: dict[str, float] = {}  # rooms touched since the last write
        self._writer: asyncio.Task[None] | None = None
        store.on_lost = self._forget  # a room given out whose write failed (store.py)

    @property
    def ttl(self) -> float:
        return self.store.ttl

    @property
    def lost(self) -> int:
        return self.store.lost

    # -- reads -------------------------------------------------------------------------------

    async def get(self, room_id: str, now: float) -> Room | None:
        """As RoomStore.get: None if the room does not exist or has expired."""
        entry = self._rooms.get(room_id)
        if entry is not None:
            room, read_at = entry
            if room.last_active > now - self.ttl and time.monotonic() - read_at < self.max_age:
                return room
        if not is_room_id(room_id):
            return None
        room = await self.store.get(room_id, now)
        if room is None:
            self._rooms.pop(room_id, None)
            return None
        pending = self._touches.get(room_id)
        if pending is not None and pending > room.last_active:  # not yet written
            room = dataclasses.replace(room, last_active=pending)
        self._remember(room)
        return room

    async def verify_pin(self, room: Room, pin: str) -> bool:
        return await self.store.verify_pin(room, pin)

    async def count(self) -> int:
        await self.flush()
        return await self.store.count()

    async def ping(self) -> bool:
        return await self.store.ping()

    async def turn_secret(self) -> str:
        return await self.store.turn_secret()

    def limiter(self, name: str, limit: int, window: float) -> Limiter:
        return self.store.limiter(name, limit, window)

    # -- writes ------------------------------------------------------------------------------

    async def create(self, **options: Any) -> tuple[str, str | None]:
        """As RoomStore.create_room; the new room is remembered, so its joins need no read."""
        room, pin = await self.store.create_room(**options)
        self._remember(room)
        return room.id, pin

    async def touch(self, room_ids: Iterable[str], now: float) -> None:
        """Mark rooms active; the store hears of it from the writer task, soon."""
        recent = now - min(TOUCH_SLACK_MAX, self.ttl * TOUCH_SLACK_SHARE)
        for room_id in room_ids:
            entry = self._rooms.get(room_id)
            if entry is not None and entry[0].last_active >= recent:
                continue  # written (or about to be) recently enough
            if self._touches.get(room_id, 0.0) < now:
                self._touches[room_id] = now
            if entry is not None and entry[0].last_active < now:
                self._rooms[room_id] = (dataclasses.replace(entry[0], last_active=now), entry[1])
        if self._touches and (self._writer is None or self._writer.done()):
            self._writer = asyncio.create_task(self._write_touches())

    async def sweep(self, now: float) -> int:
        await self.flush()
        expired = [
            key for key, (room, _) in self._rooms.items() if room.last_active <= now - self.ttl
        ]
        for key in expired:
            del self._rooms[key]
        return await self.store.sweep(now)

    async def flush(self) -> None:
        """Write the touches not yet written (the writer may be writing others right now)."""
        touches, self._touches = self._touches, {}
        await self._store_touches(touches)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        with contextlib.suppress(Exception):  # a store already closed has nothing to take
            # Bounded as the store's own closing is: a touch waits for the rooms given out.
            await asyncio.wait_for(self.flush(), CLOSE_FLUSH_TIMEOUT)
        await self.store.close()

    # -- internals ---------------------------------------------------------------------------

    def _forget(self, room_id: str) -> None:
        self._rooms.pop(room_id, None)
        self._touches.pop(room_id, None)

    def _remember(self, room: Room) -> None:
        self._rooms.pop(room.id, None)
        self._rooms[room.id] = (room, time.monotonic())
        while len(self._rooms) > self.max_entries:
            del self._rooms[next(iter(self._rooms))]

    async def _write_touches(self) -> None:
        """The one writer: all touches that piled up go to the store in one call."""
        while self._touches:
            touches, self._touches = self._touches, {}
            try:
                await self._store_touches(touches)
            except StoreUnavailable:  # Redis away: rooms with peers are touched again later
                return
            except Exception:  # the next touch or sweep tries again; the room is not lost
                log.exception("writing room activity failed")
                return

    async def _store_touches(self, touches: dict[str, float]) -> None:
        if touches:
            # One time for the batch: the latest, which is at most one batch's age ahead.
            await self.store.touch(list(touches), max(touches.values()))
