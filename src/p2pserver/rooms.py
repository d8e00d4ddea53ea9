"""RoomStore: rooms and server metadata in SQLite (aiosqlite, WAL), with a versioned schema.

The default back end of the store interface (store.py); redisstore.py is the other."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import re
import secrets
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiosqlite

from p2pserver import pins
from p2pserver.config import SYNC_MODES
from p2pserver.ratelimit import MemoryLimiter

log = logging.getLogger("p2pserver.rooms")

LOST_LOG_INTERVAL = 10.0  # seconds between two log lines about rooms lost to failed writes
CLOSE_FLUSH_TIMEOUT = 5.0  # how long closing waits for rooms not yet written

# token_urlsafe(16): 128 random bits in 22 URL-safe characters.
ROOM_ID_BYTES = 16
_ROOM_ID_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")


def is_room_id(text: str) -> bool:
    """Cheap shape check so garbage ids never reach the database."""
    return _ROOM_ID_RE.fullmatch(text) is not None


@dataclass(frozen=True)
class Room:
    id: str
    pin_hash: str | None
    max_peers: int
    created: float
    last_active: float
    private: bool = False  # relay-only: welcome tells peers iceTransportPolicy "relay"

    @property
    def has_pin(self) -> bool:
        return self.pin_hash is not None


Migration = Callable[[aiosqlite.Connection], Awaitable[None]]


async def _v1(db: aiosqlite.Connection) -> None:
    await db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    await db.execute(
        """CREATE TABLE rooms (
            id TEXT PRIMARY KEY,
            pin_hash TEXT,
            max_peers INTEGER NOT NULL,
            created REAL NOT NULL,
            last_active REAL NOT NULL
        )"""
    )
    await db.execute("CREATE INDEX rooms_last_active ON rooms (last_active)")


async def _v2(db: aiosqlite.Connection) -> None:
    # Private rooms (docs/web.md): rooms made before this column existed were not private.
    await db.execute("ALTER TABLE rooms ADD COLUMN private INTEGER NOT NULL DEFAULT 0")


# MIGRATIONS[i] takes a file from user_version i to i + 1. Append, never edit: files in the
# field are at every version.
MIGRATIONS: tuple[Migration, ...] = (_v1, _v2)
SCHEMA_VERSION = len(MIGRATIONS)


async def check_pin(room: Room, pin: str) -> bool:
    """`pin` opens `room` (a room without a PIN opens with any)."""
    if room.pin_hash is None:
        return True
    # scrypt is deliberately slow: keep it off the event loop.
    return await asyncio.to_thread(pins.verify_pin, pin, room.pin_hash)


async def new_room(
    add: Callable[[Room], Awaitable[bool]],
    *,
    with_pin: bool,
    max_peers: int,
    now: float,
    private: bool,
) -> tuple[Room, str | None]:
    """A room with a fresh id and, if asked, a PIN (stored only as a hash), once `add` has
    taken it; `add` says False when the id was taken (2**-128 odds, but cheap to handle; a
    store that answers before its write finds out later, see RoomStore._insert)."""
    pin = pins.new_pin() if with_pin else None
    pin_hash = await asyncio.to_thread(pins.hash_pin, pin) if pin else None
    while True:
        room = Room(secrets.token_urlsafe(ROOM_ID_BYTES), pin_hash, max_peers, now, now, private)
        if await add(room):
            return room, pin


class RoomStore:
    """Rooms in SQLite: reads on one aiosqlite connection, writes through `_Writer`'s own.

    Every cursor is closed (or dropped) on aiosqlite's worker thread, never left to the garbage
    collector on the event loop's thread: a sqlite3 cursor that dies holding a statement resets
    it, and statements are shared through the connection's statement cache, so a cursor
    collected on the loop's thread could reset a statement the worker thread was running for
    another query at that moment (SQLITE_MISUSE, "bad parameter or other API misuse").
    """

    def __init__(
        self, db: aiosqlite.Connection, ttl: float, path: str | None = None, sync: str = "normal"
    ) -> None:
        self._db = db
        self.ttl = ttl
        self.sync = sync
        self._inserts: list[tuple[Room, asyncio.Future[None]]] = []
        self._inserter: asyncio.Task[None] | None = None
        # --db-sync normal: rooms given out but not yet committed, and their inserts' futures
        # (see _insert). `lost` counts those whose write failed (a metric, docs/api.md#rooms).
        self._unsaved: dict[str, tuple[Room, asyncio.Future[None]]] = {}
        self._transaction = asyncio.Lock()  # ":memory:": writes share the main connection
        self._writes_fail = False  # the last insert failed: wait for each write until one works
        self._closed = False
        self.lost = 0
        self.on_lost: Callable[[str], None] = lambda room_id: None  # the cache forgets it
        self._lost_logged = (0, -LOST_LOG_INTERVAL)  # (lost when last logged, when)
        self._lost_error: BaseException | None = None
        self._lost_log: asyncio.TimerHandle | None = None
        # A file has a second connection for inserts; ":memory:" would be another database.
        self._writer = _Writer(path, sync) if path and path != ":memory:" else None

    @classmethod
    async def open(cls, path: str, ttl: float, sync: str = "normal") -> RoomStore:
        """`sync` is --db-sync (docs/api.md#rooms), SQLite's synchronous setting for the file.
        In WAL mode, NORMAL syncs the disk at checkpoints only: a power cut may lose the last
        commits. FULL syncs at every commit, and create_room then answers only after it."""
        if sync not in SYNC_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SYNC_MODES)}")
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            await db.execute("PRAGMA busy_timeout = 5000")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute(f"PRAGMA synchronous = {sync.upper()}")
            await migrate(db)
        except BaseException:
            await db.close()
            raise
        return cls(db, ttl, path, sync)

    async def close(self) -> None:
        self._closed = True
        try:
            with contextlib.suppress(TimeoutError):  # rooms already given out go to disk first
                await asyncio.wait_for(self._written(), CLOSE_FLUSH_TIMEOUT)
        finally:  # also when closing is cancelled: the thread and the file are let go
            if self._inserter is not None:
                # A batch already on the writer's thread may still commit there, though its
                # rooms are then counted as lost.
                self._inserter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._inserter
            for _, waiter in self._inserts:
                _settle(waiter, RuntimeError("room store closed"))
            self._inserts = []
            if self._writer is not None:
                await self._writer.close()
            await self._db.close()
            # Last, once the callbacks of the rooms just failed have run: what the rate limit
            # held back is said now, not by a timer the process will not live to see.
            if self._lost_log is not None:
                self._lost_log.cancel()
                self._log_lost()

    async def ping(self) -> bool:
        try:
            return await self._fetchone("SELECT 1", ()) == (1,)
        except (aiosqlite.Error, ValueError):
            return False

    async def create_room(
        self, *, with_pin: bool, max_peers: int, now: float, private: bool = False
    ) -> tuple[Room, str | None]:
        """Create a room; return it and its PIN (or None), once it is committed with
        --db-sync full, once it is queued for the writer with normal (see _insert)."""
        return await new_room(
            self._add, with_pin=with_pin, max_peers=max_peers, now=now, private=private
        )

    async def _add(self, room: Room) -> bool:
        try:
            await self._insert(room)
        except aiosqlite.IntegrityError:  # the id is taken
            return False
        return True

    async def _insert(self, room: Room) -> None:
        """Queue the room for the inserter; with --db-sync full, wait until its transaction is
        committed. Rooms created at the same time share one transaction, so one commit (a
        disk sync with full) covers them all instead of one each.

        With --db-sync normal the room is given out at once, as Redis acknowledges a write
        before it reaches the disk: until its commit, milliseconds later, `get` answers from
        `_unsaved`. A crash in those milliseconds loses it (so may a power cut later, with
        normal); a failed write loses it too, counted and logged (docs/api.md#rooms). Waiting
        for the writer's thread on a busy core was a tenth of a peer's time to get ready.
        """
        if self._closed:
            raise RuntimeError("room store closed")
        waiter = asyncio.get_running_loop().create_future()
        self._inserts.append((room, waiter))
        if self._inserter is None or self._inserter.done():
            self._inserter = asyncio.create_task(self._insert_batches())
        if self.sync == "full" or self._writes_fail:  # a failing store answers each create
            await waiter
            return
        self._unsaved[room.id] = (room, waiter)
        waiter.add_done_callback(functools.partial(self._saved, room.id))

    def _saved(self, room_id: str, waiter: asyncio.Future[None]) -> None:
        """An unsaved room's insert is over: on disk, or lost."""
        self._unsaved.pop(room_id, None)
        error = None if waiter.cancelled() else waiter.exception()
        if error is None:
            return
        if not isinstance(error, aiosqlite.IntegrityError):  # a taken id says nothing of the disk
            self._writes_fail = True  # until a write works, creates wait for theirs (_insert)
        self.lost += 1
        self._lost_error = error
        self.on_lost(room_id)
        if self._lost_log is None:  # one line for a failed batch, one per interval at most
            loop = asyncio.get_running_loop()
            when = max(loop.time(), self._lost_logged[1] + LOST_LOG_INTERVAL)
            self._lost_log = loop.call_at(when, self._log_lost)

    def _log_lost(self) -> None:
        self._lost_log = None
        last_count, _ = self._lost_logged
        self._lost_logged = (self.lost, asyncio.get_running_loop().time())
        error = self._lost_error
        log.error(
            "%d new room(s) could not be written and are lost (%d in all): %r",
            self.lost - last_count,
            self.lost,
            error,
            exc_info=error if last_count == 0 else None,  # the traceback the first time
        )

    async def _written(self) -> None:
        """Wait until every room given out so far is written (or lost)."""
        waiters = [waiter for _, waiter in self._unsaved.values()]
        if waiters:
            await asyncio.wait(waiters)

    async def _insert_batches(self) -> None:
        while self._inserts:
            batch, self._inserts = self._inserts, []
            rows = [
                (r.id, r.pin_hash, r.max_peers, r.created, r.last_active, r.private)
                for r, _ in batch
            ]
            try:
                await self._insert_rows(rows)
            except aiosqlite.IntegrityError:  # an id taken: each on its own, so only it fails
                for row, (_, waiter) in zip(rows, batch, strict=True):
                    try:
                        await self._insert_rows([row])
                    except Exception as exc:
                        _settle(waiter, exc)
                    else:
                        _settle(waiter, None)
            except Exception as exc:
                for _, waiter in batch:
                    _settle(waiter, exc)
            else:
                self._writes_fail = False
                for _, waiter in batch:
                    _settle(waiter, None)
            finally:  # cancelled (closing): nobody may wait forever
                for _, waiter in batch:
                    _settle(waiter, RuntimeError("room store closed"))

    async def _insert_rows(self, rows: list[tuple[Any, ...]]) -> None:
        await self._write_many(
            "INSERT INTO rooms (id, pin_hash, max_peers, created, last_active, private)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )

    async def get(self, room_id: str, now: float) -> Room | None:
        """The room, or None if it does not exist or has expired (even if not yet swept)."""
        if not is_room_id(room_id):
            return None
        unsaved = self._unsaved.get(room_id)
        if unsaved is not None:  # given out, not yet committed (see _insert)
            return unsaved[0] if unsaved[0].last_active > now - self.ttl else None
        row = await self._fetchone(
            "SELECT id, pin_hash, max_peers, created, last_active, private FROM rooms"
            " WHERE id = ? AND last_active > ?",
            (room_id, now - self.ttl),
        )
        return None if row is None else Room(*row[:5], private=bool(row[5]))

    async def verify_pin(self, room: Room, pin: str) -> bool:
        return await check_pin(room, pin)

    def limiter(self, name: str, limit: int, window: float) -> MemoryLimiter:
        """One process uses the file: its rate limits can stay in its memory (store.py)."""
        return MemoryLimiter(limit, window)

    async def touch(self, room_ids: Iterable[str], now: float) -> None:
        rows = [(now, room_id, now) for room_id in room_ids]
        if rows:
            await self._written()  # a room given out but not yet inserted would miss it
            await self._write_many(
                "UPDATE rooms SET last_active = ? WHERE id = ? AND last_active < ?", rows
            )

    async def sweep(self, now: float) -> int:
        """Delete rooms idle for longer than the TTL; return how many (a room given out and
        not yet written is new: nothing to wait for)."""
        return await self._write_many(
            "DELETE FROM rooms WHERE last_active <= ?", [(now - self.ttl,)]
        )

    async def count(self) -> int:
        await self._written()
        row = await self._fetchone("SELECT count(*) FROM rooms", ())
        return int(row[0]) if row else 0

    async def meta_get_or_set(self, key: str, value: str) -> str:
        """meta[key], storing `value` first if absent (race-free across processes)."""
        await self._write_many(
            "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", [(key, value)]
        )
        row = await self._fetchone("SELECT value FROM meta WHERE key = ?", (key,))
        assert row is not None
        return str(row[0])

    async def turn_secret(self) -> str:
        """The TURN REST API secret generated on first start, so credentials survive restarts."""
        return await self.meta_get_or_set("turn_secret", secrets.token_urlsafe(32))

    # Both helpers finish with the cursor on the worker thread (see the class docstring).

    async def _fetchone(self, sql: str, params: tuple[Any, ...]) -> Any:
        rows = await self._db.execute_fetchall(sql, params)  # the cursor dies in the worker
        return next(iter(rows), None)

    async def _write(self, sql: str, params: tuple[Any, ...]) -> int:
        """Run one statement; return how many rows it changed."""
        async with self._db.execute(sql, params) as cur:
            return cur.rowcount

    async def _write_many(self, sql: str, rows: list[tuple[Any, ...]]) -> int:
        """Run `sql` once per row in one transaction (one disk sync); return the rows changed.

        With a file, every write goes through the writer's connection: two connections that
        both write wait on each other's locks (busy_timeout sleeps), and autocommit would sync
        the disk once per row.
        """
        if self._writer is not None:
            return await self._writer.write_many(sql, rows)
        async with self._transaction:  # one at a time on the one connection
            await self._write("BEGIN IMMEDIATE", ())
            try:
                async with self._db.executemany(sql, rows) as cur:
                    changed = cur.rowcount
                await self._write("COMMIT", ())
            except BaseException:
                with contextlib.suppress(aiosqlite.Error, ValueError):
                    await self._write("ROLLBACK", ())
                raise
        return changed


class _Writer:
    """A connection of its own, on a thread of its own, for every write to the file.

    A write is one trip to that thread (BEGIN, the statements, COMMIT) where aiosqlite would
    take three, each waiting its turn on a busy event loop. One writing connection never waits
    on another's lock; WAL lets it write while the main connection reads. A trip is a queue and
    the loop's call_soon_threadsafe, as in aiosqlite: run_in_executor's concurrent Future (a
    Condition and its locks, per call) cost more than the write on a busy loop.
    """

    def __init__(self, path: str, sync: str) -> None:
        self._path = path
        self._sync = sync
        self._conn: sqlite3.Connection | None = None
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future[Any]] | None]
        self._jobs = queue.SimpleQueue()
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="p2pserver-rooms", daemon=True)
        self._thread.start()

    async def write_many(self, sql: str, rows: list[tuple[Any, ...]]) -> int:
        return int(await self._call(functools.partial(self._write_many, sql, rows)))

    async def _call(self, job: Callable[[], Any]) -> Any:
        if self._closing:  # nothing queued after the stop would ever run
            raise RuntimeError("room store closed")
        future = asyncio.get_running_loop().create_future()
        self._jobs.put((job, future))
        return await future

    def _serve(self) -> None:
        """The writer's thread: run each job, hand its outcome to the future's loop."""
        while (item := self._jobs.get()) is not None:
            job, future = item
            try:
                result = job()
            except BaseException as exc:
                future.get_loop().call_soon_threadsafe(_settle, future, exc)
            else:
                future.get_loop().call_soon_threadsafe(_settle, future, None, result)
        self._close()

    async def close(self) -> None:
        """Close the connection once the writes queued before are done."""
        if not self._closing:
            self._closing = True
            self._jobs.put(None)
            await asyncio.to_thread(self._thread.join)

    def _write_many(self, sql: str, rows: list[tuple[Any, ...]]) -> int:
        if self._conn is None:
            self._conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA busy_timeout = 5000")  # other processes on the file
            self._conn.execute(f"PRAGMA synchronous = {self._sync.upper()}")  # RoomStore.open
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            changed = conn.executemany(sql, rows).rowcount
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return changed

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _settle(future: asyncio.Future[Any], error: BaseException | None, result: Any = None) -> None:
    if future.done():  # its awaiter went away (cancelled)
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


async def migrate(db: aiosqlite.Connection) -> int:
    """Bring the schema up to SCHEMA_VERSION; return the version the file was at."""
    await db.execute("BEGIN IMMEDIATE")  # one migrating process at a time
    try:
        async with db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        found = int(row[0]) if row else 0
        if found > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema v{found} is newer than this p2pserver (v{SCHEMA_VERSION})"
            )
        for version in range(found, SCHEMA_VERSION):
            await MIGRATIONS[version](db)
        if found != SCHEMA_VERSION:
            await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        await db.execute("COMMIT")
    except BaseException:
        await db.execute("ROLLBACK")
        raise
    return found
