"""In-memory rate limits: a token bucket per WebSocket, keyed sliding windows, and the
Limiter (store.py) a one-process store keeps in memory."""

from __future__ import annotations

import time
from collections import deque

# What a Limiter (store.py) hands out for an attempt that counted; give it back to un-count it.
Ticket = object


class TokenBucket:
    """`rate` tokens per second, holding at most `burst`; one token per message."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = now

    def take(self, now: float) -> bool:
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class SlidingWindow:
    """At most `limit` events per key in any `window` seconds.

    Keys are client addresses or room ids, so the table is capped: an attacker cycling through
    addresses evicts the oldest keys rather than growing memory without bound.
    """

    def __init__(self, limit: int, window: float, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._events: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float] | None:
        events = self._events.get(key)
        if events is None:
            return None
        while events and events[0] <= now - self.window:
            events.popleft()
        if not events:
            del self._events[key]
            return None
        return events

    def count(self, key: str, now: float) -> int:
        events = self._recent(key, now)
        return 0 if events is None else len(events)

    def allowed(self, key: str, now: float) -> bool:
        return self.count(key, now) < self.limit

    def hit(self, key: str, now: float) -> None:
        events = self._recent(key, now)
        if events is None:
            if len(self._events) >= self.max_keys:
                self.prune(now)
            while len(self._events) >= self.max_keys:
                del self._events[next(iter(self._events))]
            events = self._events[key] = deque(maxlen=max(self.limit, 1))
        events.append(now)

    def forget(self, key: str, stamp: float) -> None:
        """Take back one event `hit` recorded at `stamp` (an attempt that did not count)."""
        events = self._events.get(key)
        if events is not None and stamp in events:
            events.remove(stamp)
            if not events:
                del self._events[key]

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until `allowed(key)` turns true again (0 if it already is)."""
        events = self._recent(key, now)
        if events is None or len(events) < self.limit:
            return 0.0
        return max(0.0, events[0] + self.window - now)

    def prune(self, now: float) -> None:
        for key in list(self._events):
            self._recent(key, now)

    def __len__(self) -> int:
        return len(self._events)


class MemoryLimiter:
    """A Limiter in this process's memory (a SlidingWindow on the monotonic clock)."""

    def __init__(self, limit: int, window: float) -> None:
        self.window = SlidingWindow(limit, window)

    async def acquire(self, key: str) -> tuple[Ticket | None, float]:
        now = time.monotonic()
        if not self.window.allowed(key, now):
            return None, self.window.retry_after(key, now)
        self.window.hit(key, now)
        return now, 0.0

    async def release(self, key: str, ticket: Ticket) -> None:
        assert isinstance(ticket, float)
        self.window.forget(key, ticket)

    def prune(self) -> None:
        self.window.prune(time.monotonic())
