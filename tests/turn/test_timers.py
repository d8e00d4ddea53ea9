"""The timing wheel behind expiry (turn/timers.py): items come out when due, once, in O(1)."""

from __future__ import annotations

from p2pserver.turn.timers import DeadlineWheel


def drain(wheel: DeadlineWheel[str], now: float) -> list[str]:
    out = []
    while (item := wheel.pop_due(now)) is not None:
        out.append(item)
    return out


def test_items_come_out_when_their_slot_is_due() -> None:
    wheel: DeadlineWheel[str] = DeadlineWheel(tick=1.0)
    assert wheel.next_deadline() is None and wheel.pop_due(1e9) is None
    wheel.schedule("a", 10.2)  # rounded up to the slot of 11
    wheel.schedule("b", 11.0)
    wheel.schedule("c", 30.0)
    assert wheel.next_deadline() == 11.0 and len(wheel) == 3
    assert drain(wheel, 10.9) == []
    assert sorted(drain(wheel, 11.0)) == ["a", "b"]
    assert "a" not in wheel and "c" in wheel
    assert wheel.next_deadline() == 30.0


def test_earlier_moves_later_does_not_and_cancel_removes() -> None:
    wheel: DeadlineWheel[str] = DeadlineWheel(tick=1.0)
    wheel.schedule("a", 50.0)
    wheel.schedule("a", 20.0)  # earlier: moved
    wheel.schedule("a", 90.0)  # later: stays at 20 (the caller looks again then)
    assert drain(wheel, 19.0) == [] and drain(wheel, 20.0) == ["a"]
    assert drain(wheel, 50.0) == []  # came out once only
    wheel.schedule("b", 5.0)
    wheel.cancel("b")
    wheel.cancel("b")  # twice is fine
    assert drain(wheel, 100.0) == [] and len(wheel) == 0
    wheel.schedule("b", 5.0)  # again, into the slot that emptied
    assert drain(wheel, 5.0) == ["b"] and wheel.next_deadline() is None
