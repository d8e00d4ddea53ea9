"""The room store on both back ends (SQLite, and Redis on a real redis-server), PIN hashing,
rate limiters and iceServers, without a server."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from httpkit import rooms_on_disk
from hypothesis import given
from hypothesis import strategies as st

from p2pserver import credentials, pins, roomcache, rooms
from p2pserver.config import Settings
from p2pserver.ice import host_from_header, ice_servers, url_host
from p2pserver.ratelimit import MemoryLimiter, SlidingWindow, TokenBucket
from p2pserver.redisstore import RedisRoomStore, redacted
from p2pserver.roomcache import RoomCache
from p2pserver.rooms import MIGRATIONS, SCHEMA_VERSION, RoomStore, migrate
from p2pserver.store import Store

OpenStore = Callable[[float], Awaitable[Store]]


async def create(store: Store, **options: Any) -> tuple[str, str | None]:
    """A new room's id and PIN (or None), as the HTTP API hands them out."""
    room, pin = await store.create_room(**options)
    return room.id, pin


@pytest.fixture(params=["sqlite", "redis"])
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenStore]:
    """Opens the store interface on one back end; every call opens the same rooms again (one
    file, or one Redis), as another process or instance would."""
    opened: list[Store] = []
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None

    async def open_(ttl: float) -> Store:
        if url is not None:
            store: Store = await RedisRoomStore.open(url, ttl)
        else:
            store = await RoomStore.open(str(tmp_path / "a.db"), ttl)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        with contextlib.suppress(Exception):  # closed by the test already
            await store.close()


async def test_fresh_file_gets_current_schema_and_wal(tmp_path: Path) -> None:
    store = await RoomStore.open(str(tmp_path / "a.db"), ttl=60)
    await store.close()
    with sqlite3.connect(tmp_path / "a.db") as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_migrate_is_idempotent_and_keeps_rooms(tmp_path: Path) -> None:
    path = str(tmp_path / "a.db")
    store = await RoomStore.open(path, ttl=60)
    room_id, pin = await create(store, with_pin=True, max_peers=3, now=1000.0)
    await store.close()
    async with aiosqlite.connect(path, isolation_level=None) as db:
        assert await migrate(db) == SCHEMA_VERSION
    store = await RoomStore.open(path, ttl=60)
    room = await store.get(room_id, now=1001.0)
    assert room is not None and room.max_peers == 3
    assert pin is not None and await store.verify_pin(room, pin)
    await store.close()


async def test_a_v1_file_without_the_private_column_is_migrated_on_open(tmp_path: Path) -> None:
    path = str(tmp_path / "v1.db")
    async with aiosqlite.connect(path, isolation_level=None) as db:  # as release v1 left it
        await MIGRATIONS[0](db)
        await db.execute("PRAGMA user_version = 1")
        await db.execute(
            "INSERT INTO rooms (id, pin_hash, max_peers, created, last_active)"
            " VALUES ('OldRoomOldRoomOldRoom1', NULL, 2, 1000, 1000)"
        )
    store = await RoomStore.open(path, ttl=60)
    old = await store.get("OldRoomOldRoomOldRoom1", now=1001.0)
    assert old is not None and not old.private and old.max_peers == 2
    new_id, _ = await create(store, with_pin=False, max_peers=2, now=1000.0, private=True)
    new = await store.get(new_id, now=1001.0)
    assert new is not None and new.private
    await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        columns = [row[1] for row in db.execute("PRAGMA table_info(rooms)")]
        assert "private" in columns


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="newer"):
        await RoomStore.open(str(path), ttl=60)


async def test_expiry_hides_then_sweep_deletes(open_store: OpenStore) -> None:
    store = await open_store(100)
    idle, _ = await create(store, with_pin=False, max_peers=2, now=1000.0)
    busy, _ = await create(store, with_pin=False, max_peers=2, now=1000.0)
    await store.touch([busy], now=1080.0)
    assert await store.get(idle, now=1099.0) is not None
    assert await store.get(idle, now=1100.0) is None  # expired, not yet swept
    assert await store.get(busy, now=1100.0) is not None
    assert await store.count() == 2
    assert await store.sweep(now=1150.0) == 1
    assert await store.count() == 1
    assert await store.get(busy, now=1150.0) is not None
    assert await store.get(idle, now=1000.0) is None  # deleted, not only hidden


async def test_rooms_keep_what_they_were_made_with(open_store: OpenStore) -> None:
    store = await open_store(100)
    plain, no_pin = await create(store, with_pin=False, max_peers=5, now=1000.0)
    locked, pin = await create(store, with_pin=True, max_peers=2, now=1000.0, private=True)
    if isinstance(store, RoomStore):
        await store._written()  # with --db-sync normal, create answers before the commit
    again = await open_store(100)  # another process or instance
    room = await again.get(plain, now=1001.0)
    assert room is not None and no_pin is None
    assert (room.max_peers, room.has_pin, room.private, room.created) == (5, False, False, 1000.0)
    room = await again.get(locked, now=1001.0)
    assert room is not None and pin is not None and room.pin_hash is not None
    assert (room.max_peers, room.has_pin, room.private) == (2, True, True)
    assert pin not in room.pin_hash
    assert await again.verify_pin(room, pin)
    assert not await again.verify_pin(room, f"{(int(pin) + 1) % 10**6:06d}")
    assert await again.get("NoSuchRoomNoSuchRoom00", now=1001.0) is None
    assert await again.get("'; DROP TABLE rooms; --", now=1001.0) is None


async def test_touch_never_moves_last_active_back(open_store: OpenStore) -> None:
    store = await open_store(100)
    room_id, _ = await create(store, with_pin=False, max_peers=2, now=1000.0)
    await store.touch([room_id], now=1050.0)
    await store.touch([room_id], now=1010.0)
    room = await store.get(room_id, now=1051.0)
    assert room is not None and room.last_active == 1050.0


async def test_turn_secret_is_generated_once(open_store: OpenStore) -> None:
    store = await open_store(60)
    first = await store.turn_secret()
    assert first == await store.turn_secret()
    await store.close()
    store = await open_store(60)
    assert await store.turn_secret() == first
    assert len(first) >= 40


async def test_limiter_counts_attempts_and_takes_back_released_ones(open_store: OpenStore) -> None:
    store = await open_store(60)
    limiter = store.limiter("test", 2, 60.0)
    first, wait = await limiter.acquire("a")
    assert first is not None and wait == 0.0
    second, _ = await limiter.acquire("a")
    assert second is not None
    refused, wait = await limiter.acquire("a")
    assert refused is None and 0.0 < wait <= 60.0
    assert (await limiter.acquire("b"))[0] is not None  # keys apart
    await limiter.release("a", second)
    assert (await limiter.acquire("a"))[0] is not None
    assert (await limiter.acquire("a"))[0] is None
    limiter.prune()


async def test_limiter_holds_for_racing_attempts(open_store: OpenStore) -> None:
    # Two stores on one back end are two instances (or, for SQLite, one process's limits).
    stores = [await open_store(60), await open_store(60)]
    if isinstance(stores[0], RoomStore):  # in memory: one process, one limiter
        limiters = [stores[0].limiter("race", 5, 60.0)] * 2
    else:
        limiters = [store.limiter("race", 5, 60.0) for store in stores]
    results = await asyncio.gather(*(limiters[i % 2].acquire("k") for i in range(40)))
    assert sum(ticket is not None for ticket, _ in results) == 5


async def test_limiter_window_passes(open_store: OpenStore) -> None:
    store = await open_store(60)
    limiter = store.limiter("short", 1, 0.2)
    assert (await limiter.acquire("k"))[0] is not None
    assert (await limiter.acquire("k"))[0] is None
    deadline = asyncio.get_running_loop().time() + 20
    while (await limiter.acquire("k"))[0] is None:  # the event: the old attempt ages out
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)


async def test_get_rejects_malformed_ids(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    store = await RoomStore.open(str(path), ttl=60)
    bad = ["'; DROP TABLE rooms; --", "", "x" * 65]
    with sqlite3.connect(path) as db:  # rows the shape check must keep get() from reaching
        db.executemany(
            "INSERT INTO rooms (id, pin_hash, max_peers, created, last_active)"
            " VALUES (?, NULL, 2, 0, 0)",
            [(b,) for b in bad],
        )
    for room_id in bad:
        assert await store.get(room_id, now=0) is None, room_id
    await store.close()


def test_pins_are_six_digits_and_hash_verifies() -> None:
    pin = pins.new_pin()
    assert len(pin) == 6 and pin.isdigit()
    encoded = pins.hash_pin(pin)
    assert pin not in encoded
    assert pins.verify_pin(pin, encoded)
    wrong = f"{(int(pin) + 1) % 10**6:06d}"
    assert not pins.verify_pin(wrong, encoded)
    assert not pins.verify_pin(pin + "0", encoded)
    assert not pins.verify_pin("\uff11\uff12\uff13\uff14\uff15\uff16", pins.hash_pin("123456"))
    assert not pins.verify_pin(pin, "garbage")
    assert not pins.verify_pin(pin, "md5$1$2$3$4$5")


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5)  # one token back after half a second at 2/s
    assert not bucket.take(0.5)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # capped at burst


def test_sliding_window() -> None:
    window = SlidingWindow(limit=2, window=10.0)
    assert window.allowed("a", 0.0)
    window.hit("a", 0.0)
    window.hit("a", 4.0)
    assert not window.allowed("a", 5.0)
    assert window.allowed("b", 5.0)
    assert window.retry_after("a", 5.0) == pytest.approx(5.0)
    assert window.allowed("a", 10.0)
    window.prune(100.0)
    assert len(window) == 0


def test_sliding_window_caps_keys() -> None:
    window = SlidingWindow(limit=1, window=10.0, max_keys=100)
    for i in range(1000):
        window.hit(f"k{i}", 0.0)
    assert len(window) <= 100
    assert not window.allowed("k999", 1.0)


@pytest.mark.parametrize(
    ("header", "host"),
    [
        ("example.org:3000", "example.org"),
        ("Example.ORG", "example.org"),
        ("127.0.0.1:3000", "127.0.0.1"),
        ("[::1]:3000", "[::1]"),
        ("[2001:DB8::1]", "[2001:db8::1]"),
        ("2001:db8::1", "[2001:db8::1]"),
        ("evil.example/path?x", None),
        ("a b", None),
        ("", None),
        ("[nope]:1", None),
    ],
)
def test_host_from_header(header: str, host: str | None) -> None:
    assert host_from_header(header) == host


@given(st.text(max_size=80))
def test_url_host_output_is_safe_in_urls(text: str) -> None:
    host = url_host(text)
    if host is not None:
        assert all(c.isalnum() or c in ".-[]:" for c in host)
        assert host.isascii()


def test_ice_servers_urls_and_credentials() -> None:
    settings = Settings(turn_port=3479, ice_ttl=600)
    servers = ice_servers(settings, "[::1]", "s3cret", "peer1", now=1_000_000.0)
    assert servers[0] == {"urls": ["stun:[::1]:3479"]}
    turn = servers[1]
    assert turn["urls"] == ["turn:[::1]:3479?transport=udp", "turn:[::1]:3479?transport=tcp"]
    assert turn["username"] == "1000600:peer1"
    assert turn["credential"] == credentials.rest_password("s3cret", turn["username"])


def test_ice_servers_add_turns_with_tls() -> None:
    settings = Settings(tls_cert="c.pem", tls_key="k.pem", tls_port=5350)
    urls = ice_servers(settings, "example.org", "s", "p", now=0.0)[1]["urls"]
    assert "turns:example.org:5350?transport=tcp" in urls


async def test_concurrent_joins_and_touches_share_one_connection(open_store: OpenStore) -> None:
    # What joins do (a get, then a touch), hundreds at a time, plus the sweeper's batches. This
    # used to fail now and then with sqlite3.InterfaceError (SQLITE_MISUSE): see RoomStore.
    store = await open_store(3600)
    now = 1000.0
    ids = [(await create(store, with_pin=False, max_peers=2, now=now))[0] for _ in range(20)]

    async def join(i: int) -> str | None:
        room = await store.get(ids[i % len(ids)], now + i)
        if room is not None:
            await store.touch([room.id], now + i)
        return room.id if room is not None else None

    try:
        for _ in range(10):
            joins = [join(i) for i in range(400)]
            results = await asyncio.gather(*joins, store.touch(ids, now), store.sweep(now))
            # Every join read its own room back (none lost to the sweep or a misused statement).
            assert results[:-2] == [ids[i % len(ids)] for i in range(400)]
        assert await store.count() == 20
    finally:
        await store.close()


@pytest.mark.parametrize(("sync", "level"), [("normal", 1), ("full", 2)])
async def test_db_sync_sets_both_connections(tmp_path: Path, sync: str, level: int) -> None:
    store = await RoomStore.open(str(tmp_path / "a.db"), ttl=100, sync=sync)
    try:
        await create(store, with_pin=False, max_peers=2, now=1000.0)  # opens the writer's
        await store._written()  # with normal, create answers before the insert
        assert await store._fetchone("PRAGMA synchronous", ()) == (level,)
        writer = store._writer
        assert writer is not None and writer._conn is not None
        conn = writer._conn
        assert await writer._call(lambda: conn.execute("PRAGMA synchronous").fetchone()) == (level,)
    finally:
        await store.close()
    with pytest.raises(ValueError, match="synchronous"):
        await RoomStore.open(str(tmp_path / "b.db"), ttl=100, sync="off")


async def test_an_in_memory_store_writes_through_its_one_connection() -> None:
    # ":memory:" is a database per connection: no writer of its own, the writes go through
    # RoomStore._write_many's transaction on the main connection.
    store = await RoomStore.open(":memory:", ttl=100)
    try:
        assert store._writer is None
        kept, _ = await create(store, with_pin=False, max_peers=2, now=1000.0)
        gone, _ = await create(store, with_pin=False, max_peers=2, now=1000.0)
        await store.touch([kept], 1090.0)
        assert await store.sweep(1150.0) == 1
        assert await store.get(gone, 1150.0) is None
        room = await store.get(kept, 1150.0)
        assert room is not None and room.last_active == 1090.0
        secret = await store.turn_secret()
        assert await store.turn_secret() == secret
        # Writes at the same moment take the one connection in turn (a nested BEGIN fails).
        _, swept, again, *_ = await asyncio.gather(
            store.touch([kept], 1091.0),
            store.sweep(1150.0),
            store.turn_secret(),
            *(create(store, with_pin=False, max_peers=2, now=1100.0) for _ in range(3)),
        )
        assert swept == 0 and again == secret
        assert await store.count() == 4
    finally:
        await store.close()


async def test_a_file_is_written_through_one_connection_only(tmp_path: Path) -> None:
    # Two writing connections wait on each other's locks (busy_timeout sleeps): every write
    # goes through the writer's connection, the main one only reads.
    store = await RoomStore.open(str(tmp_path / "a.db"), ttl=100)
    try:
        room_id, _ = await create(store, with_pin=False, max_peers=2, now=1000.0)
        await store.touch([room_id], 1050.0)
        await store.turn_secret()
        assert await store.sweep(1200.0) == 1
        assert store._db.total_changes == 0
    finally:
        await store.close()


def test_redis_urls_lose_their_password_in_messages() -> None:
    assert redacted("redis://:hunter2@10.0.0.5:6380/1") == "redis://:***@10.0.0.5:6380/1"
    assert redacted("rediss://app:pw@[::1]/0") == "rediss://app:***@[::1]/0"
    assert redacted("redis://cache:6379/0") == "redis://cache:6379/0"


async def test_memory_limiter_forgets_released_attempts() -> None:
    limiter = MemoryLimiter(1, 60.0)
    ticket, _ = await limiter.acquire("k")
    assert ticket is not None
    await limiter.release("k", ticket)
    assert len(limiter.window) == 0


async def test_db_sync_full_gives_a_room_out_once_it_is_on_disk(tmp_path: Path) -> None:
    store = await RoomStore.open(str(tmp_path / "a.db"), ttl=100, sync="full")
    try:
        room_id, _ = await create(store, with_pin=False, max_peers=2, now=1000.0)
        assert room_id in rooms_on_disk(tmp_path / "a.db")
    finally:
        await store.close()


async def test_db_sync_normal_gives_a_room_out_before_its_commit(tmp_path: Path) -> None:
    """docs/api.md#rooms: the id goes out at once; the store answers for the room until its
    commit, which follows within the writer's next trip, and closing writes what is left."""
    store = await RoomStore.open(str(tmp_path / "a.db"), ttl=100)
    first, _ = await create(store, with_pin=False, max_peers=2, now=1000.0)
    assert first not in rooms_on_disk(tmp_path / "a.db")  # not yet: the writer has not run
    room = await store.get(first, 1001.0)
    assert room is not None and room.id == first
    await store.touch([first], 1050.0)  # waits for the insert, so the touch is not lost
    room = await store.get(first, 1051.0)
    assert room is not None and room.last_active == 1050.0
    assert await store.count() == 1
    assert first in rooms_on_disk(tmp_path / "a.db")
    second, _ = await create(store, with_pin=False, max_peers=2, now=1000.0)
    await store.close()  # the room just given out is written before the file closes
    assert rooms_on_disk(tmp_path / "a.db") == {first, second}
    assert store.lost == 0


async def test_a_failed_write_loses_only_the_rooms_already_given_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With --db-sync normal a room whose insert fails after its id went out is lost: counted,
    logged with its traceback once. Until a write works again, each create waits for its own
    write and fails with it, as with full; then creates go back to answering at once."""
    store = await RoomStore.open(str(tmp_path / "a.db"), ttl=100)
    failing = True
    real = store._insert_rows

    async def insert_rows(rows: list[tuple[Any, ...]]) -> None:
        if failing:
            raise sqlite3.OperationalError("disk I/O error")
        await real(rows)

    monkeypatch.setattr(store, "_insert_rows", insert_rows)
    cache = RoomCache(store)  # as the server uses it: the lost room must not live on there
    try:
        batch = await asyncio.gather(
            *(cache.create(with_pin=False, max_peers=2, now=1000.0) for _ in range(3))
        )
        await store._written()
        assert store.lost == 3
        for lost, _ in batch:
            assert await cache.get(lost, 1001.0) is None
        with pytest.raises(sqlite3.OperationalError):  # no longer given out before the write
            await create(store, with_pin=False, max_peers=2, now=1000.0)
        assert store.lost == 3  # that one was refused, not lost
        failing = False
        kept, _ = await create(store, with_pin=False, max_peers=2, now=1000.0)  # waits, works
        assert kept in rooms_on_disk(tmp_path / "a.db")
        quick, _ = await create(store, with_pin=False, max_peers=2, now=1000.0)
        assert quick not in rooms_on_disk(tmp_path / "a.db")  # answering at once again
    finally:
        await cache.close()
    assert rooms_on_disk(tmp_path / "a.db") == {kept, quick}
    lines = [r.getMessage() for r in caplog.records if "could not be written" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("3 new room(s)"), lines  # one per batch
    assert next(r for r in caplog.records if "could not be written" in r.getMessage()).exc_info


async def test_losses_within_the_log_interval_are_said_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One line per LOST_LOG_INTERVAL at most: a second failed write inside it is held back,
    and closing the store says it rather than leaving it to a timer."""
    store = await RoomStore.open(str(tmp_path / "a.db"), ttl=100)

    async def insert_rows(rows: list[tuple[Any, ...]]) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "_insert_rows", insert_rows)
    await create(store, with_pin=False, max_peers=2, now=1000.0)
    await store._written()
    store._writes_fail = False  # as if a write had worked since: the next is given out again
    await create(store, with_pin=False, max_peers=2, now=1000.0)
    await store._written()
    lines = [r.getMessage() for r in caplog.records if "could not be written" in r.getMessage()]
    assert store.lost == 2 and len(lines) == 1  # the second is held back (10 s)
    await store.close()
    lines = [r.getMessage() for r in caplog.records if "could not be written" in r.getMessage()]
    assert lines[1:] == [
        "1 new room(s) could not be written and are lost (2 in all): "
        "OperationalError('disk I/O error')"
    ]


async def test_closing_waits_for_a_stuck_write_only_so_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that never ends (a hung disk) holds a stop up for CLOSE_FLUSH_TIMEOUT, not for
    ever, also through the cache's last touches; the room it held is counted as lost."""
    monkeypatch.setattr(rooms, "CLOSE_FLUSH_TIMEOUT", 0.2)
    monkeypatch.setattr(roomcache, "CLOSE_FLUSH_TIMEOUT", 0.2)
    store = await RoomStore.open(str(tmp_path / "a.db"), ttl=100)
    hung = asyncio.Event()

    async def insert_rows(rows: list[tuple[Any, ...]]) -> None:
        await hung.wait()  # never set

    monkeypatch.setattr(store, "_insert_rows", insert_rows)
    cache = RoomCache(store)
    await cache.create(with_pin=False, max_peers=2, now=1000.0)
    await cache.touch(["room999999999999"], 1001.0)  # a touch the close will try to write
    async with asyncio.timeout(5.0):  # in this task: the touch is still the close's to write
        await cache.close()
    assert store.lost == 1
