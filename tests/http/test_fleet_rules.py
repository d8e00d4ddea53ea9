"""Fleet rules that need no Redis: what a signal for another instance does when it cannot go,
and where a signal goes for a peer that resumed on another instance (docs/deploy.md)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from p2pserver import fleet as fleet_module
from p2pserver.config import Settings
from p2pserver.fleet import INBOX, Fleet
from p2pserver.rooms import Room
from p2pserver.signaling import Connection, Hub


class _Pipeline:
    def __init__(self, sent: list[tuple[Any, ...]]) -> None:
        self.sent = sent
        self.count = 0

    def execute_command(self, *args: Any) -> None:
        self.sent.append(args)
        self.count += 1

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        return [1] * self.count


class _Redis:
    """What Fleet's writer uses of a redis client: pipelines, recorded."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    def pipeline(self, transaction: bool = True) -> _Pipeline:
        return _Pipeline(self.sent)


async def test_signals_to_other_instances_drop_when_redis_is_away_or_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    redis = _Redis()
    fleet = Fleet(redis, lambda text: None)  # type: ignore[arg-type]
    assert not fleet.up  # not started, as while Redis is away
    assert not fleet.send("other", "room", "peer", '{"type":"signal"}')
    assert fleet.dropped == 1 and redis.sent == []

    fleet.up = True
    assert fleet.send("other", "room", "peer", "frame")
    await fleet.flush()
    assert redis.sent == [("PUBLISH", INBOX + "other", "s|room|peer|frame")]

    monkeypatch.setattr(fleet_module, "MAX_PENDING", 2)
    fleet._pending = [object(), object()]  # type: ignore[list-item]  # the backlog is full
    assert not fleet.send("other", "room", "peer", "late")
    assert fleet.dropped == 2
    assert len(fleet._pending) == 2  # nothing added past the bound
    fleet._pending = []


class _Fleet:
    id = "here"

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str, str]] = []

    def send(self, instance: str, room_id: str, to: str, frame: str) -> bool:
        self.sent.append((instance, room_id, to, frame))
        return True


async def test_signals_follow_a_peer_that_resumed_on_another_instance() -> None:
    hub = Hub(Settings())
    fake = _Fleet()
    hub.fleet = fake  # type: ignore[assignment]
    frame = '{"type":"signal","from":"a","data":"x"}'
    hub._moved["room|moved"] = ("there", time.monotonic() + 10)
    hub._moved["room|stale"] = ("there", time.monotonic() - 1)
    hub.on_fleet_message(f"s|room|moved|{frame}")
    hub.on_fleet_message(f"s|room|stale|{frame}")  # moved too long ago: it is gone
    hub.on_fleet_message(f"s|room|nobody|{frame}")  # never here
    assert fake.sent == [("there", "room", "moved", frame)]


async def test_a_leave_can_be_said_for_another_instance() -> None:
    redis = _Redis()
    fleet = Fleet(redis, lambda text: None)  # type: ignore[arg-type]
    fleet.up = True
    fleet.leave("room", "peer", "there")
    fleet.leave("room", "mine")
    await fleet.flush()
    theirs, ours = redis.sent
    assert theirs[4:9] == (fleet_module.PREFIX + "peers:there", "peer", "there", "room", INBOX)
    assert ours[4:7] == (fleet_module.PREFIX + "peers:" + fleet.id, "mine", fleet.id)


class _Handing(_Fleet):
    """A fleet whose token names a peer on instance "there", which does not hand it over."""

    def __init__(self) -> None:
        super().__init__()
        self.left: list[tuple[str, str, str | None]] = []

    async def claim_token(self, token: str, room_id: str) -> tuple[str, str]:
        return "peer", "there"

    async def handover(self, instance: str, room_id: str, peer_id: str) -> None:
        return None  # gone, or no answer within HANDOVER_TIMEOUT

    def leave(self, room_id: str, peer_id: str, instance: str | None = None) -> None:
        self.left.append((room_id, peer_id, instance))


class _Socket:
    async def send_text(self, text: str) -> None:
        pass

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        pass


async def test_a_resume_the_other_instance_does_not_answer_frees_the_peers_place() -> None:
    # A hand-over that answers late would drop the peer there without a leave: the place it
    # holds in Redis is given up here, on that instance's behalf, when the resume is refused.
    hub = Hub(Settings())
    fake = _Handing()
    hub.fleet = fake  # type: ignore[assignment]
    now = asyncio.get_running_loop().time()
    conn = Connection(_Socket(), "192.0.2.1", hub.settings, now)  # type: ignore[arg-type]
    room = Room("room0000000000000000", None, 2, 0.0, 0.0)
    await hub._resume_elsewhere(conn, room, "token", fake)  # type: ignore[arg-type]
    assert fake.left == [(room.id, "peer", "there")]
    assert conn.dead  # refused: resume-refused
    assert hub.counts["join_failures.resume-refused"] == 1
