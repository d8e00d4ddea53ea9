"""The retransmission rule (RFC 8489 §6.3.4, RFC 8656 §7.2): a request retransmitted on the same
5-tuple with the same transaction id gets the response it got before, not a new one (so a lost
Allocate success is not answered 437 the second time)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

# RFC 8489 §6.2.1: a client gives up after Rc*RTO = 39.5 s; keep answers a little longer.
RETRANSMIT_WINDOW = 40.0


class ResponseCache:
    def __init__(self, window: float = RETRANSMIT_WINDOW, max_entries: int = 100_000) -> None:
        self.window = window
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, now: float) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] <= now:
            return None
        return entry[1]

    def put(self, key: Hashable, response: bytes, now: float) -> None:
        self._entries[key] = (now + self.window, response)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def next_deadline(self) -> float | None:
        for expires, _ in self._entries.values():  # the first expires first
            return expires
        return None

    def expire(self, now: float, limit: int | None = None) -> None:
        """Drop the entries due at `now`, at most `limit` of them (the rest wait for the next
        call: next_deadline() is then already due). Entries are in insertion order, so expiry
        times are too: the work is what expires."""
        entries = self._entries
        while entries and limit != 0:
            key, (expires, _) = next(iter(entries.items()))  # an OrderedDict: O(1)
            if expires > now:
                break
            del entries[key]
            if limit is not None:
                limit -= 1
