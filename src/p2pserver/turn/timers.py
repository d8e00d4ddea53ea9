"""A timing wheel: items due at a deadline, kept in slots of `tick` seconds.

What the TURN core's timers need (docs/turn.md, "Timers"): scheduling, moving and cancelling an
item are O(1), and taking out what is due costs what is due, never what waits. Deadlines are
rounded up to the next tick, so an item comes out at most one tick late and a busy table wakes
its caller at most once a tick.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)


class DeadlineWheel(Generic[T]):
    def __init__(self, tick: float = 1.0) -> None:
        self.tick = tick
        self._slots: dict[int, dict[T, None]] = {}  # slot number -> its items (a dict: O(1) out)
        self._heap: list[int] = []  # the slot numbers in _slots, earliest first
        self._where: dict[T, int] = {}  # item -> its slot number

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, item: object) -> bool:
        return item in self._where

    def schedule(self, item: T, deadline: float) -> None:
        """Have `item` come out of `pop_due` at `deadline` or, if it is already due earlier,
        then: a later deadline moves nothing (the caller looks again when the item comes out,
        which is cheaper than moving it on every refresh)."""
        slot = math.ceil(deadline / self.tick)
        current = self._where.get(item)
        if current is not None:
            if current <= slot:
                return
            del self._slots[current][item]  # the slot itself goes when its time comes
        self._where[item] = slot
        items = self._slots.get(slot)
        if items is None:
            self._slots[slot] = items = {}
            heapq.heappush(self._heap, slot)
        items[item] = None

    def cancel(self, item: T) -> None:
        slot = self._where.pop(item, None)
        if slot is not None:
            del self._slots[slot][item]

    def next_deadline(self) -> float | None:
        """The deadline of the earliest slot (it may have emptied since: then an early call)."""
        return self._heap[0] * self.tick if self._heap else None

    def pop_due(self, now: float) -> T | None:
        """One item whose slot is due at `now`, taken out of the wheel; None when none is."""
        heap = self._heap
        while heap and heap[0] * self.tick <= now:
            items = self._slots[heap[0]]
            if items:
                item, _ = items.popitem()
                del self._where[item]
                return item
            del self._slots[heapq.heappop(heap)]
        return None
