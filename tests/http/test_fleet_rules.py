"""Fleet rules that need no Redis: what a signal for another instance does when it cannot go,
and where a signal goes for a peer that resumed on another instance (docs/deploy.md)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from p2pserver import fleet as fleet_module
from p2pserver.config import Settings
from p2pserver.fleet import INBOX, Fleet
from p2pserver.signaling import Hub


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
