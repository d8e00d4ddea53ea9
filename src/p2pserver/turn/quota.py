"""The per-user allocation quota across TURN worker processes: a shared table of counters.

The supervisor creates one anonymous shared memory file (memfd) and hands it to every worker.
It holds one row per worker of SLOTS 32-bit counters; a username counts in the slot of a keyed
hash of it. Each worker writes only its own row (one writer: no lock), and reads the other rows
to learn how many allocations the user holds elsewhere; its own count it takes from its exact
table. When a worker dies the supervisor clears its row, as its allocations are gone.

How exact (docs/turn.md, "Workers"): a user never holds more than --user-quota allocations,
except when Allocates of the same user race on different workers in the same instant (then at
most one more per other worker). Two users whose names share a slot (1 in SLOTS, by a key the
attacker does not know) count together, so that one of them may be refused early.
"""

from __future__ import annotations

import hashlib
import mmap
import os

SLOTS = 1 << 16
_WIDTH = 4  # bytes per counter


def table_size(workers: int) -> int:
    return workers * SLOTS * _WIDTH


def create(workers: int) -> int:
    """A new zeroed table for `workers` rows: its file descriptor (pass it to the workers)."""
    fd = os.memfd_create("p2pserver-user-quota")  # close-on-exec: workers get it by pass_fds
    os.ftruncate(fd, table_size(workers))  # pages are only backed once written
    return fd


class SharedUserCounts:
    """One worker's view of the table (`me` is its row), or the supervisor's (`me` = -1)."""

    def __init__(self, fd: int, workers: int, me: int, key: bytes) -> None:
        self.workers = workers
        self.me = me
        self.key = key
        self._map = mmap.mmap(fd, table_size(workers))
        self._counts = memoryview(self._map).cast("I")

    def _slot(self, username: str) -> int:
        digest = hashlib.blake2b(username.encode(), digest_size=4, key=self.key).digest()
        return int.from_bytes(digest) % SLOTS

    def elsewhere(self, username: str) -> int:
        """Allocations `username` holds in the other workers (an upper bound: see above)."""
        slot = self._slot(username)
        counts = self._counts
        return sum(counts[row * SLOTS + slot] for row in range(self.workers) if row != self.me)

    def add(self, username: str, delta: int) -> None:
        """This worker's count for `username` changed by `delta`."""
        index = self.me * SLOTS + self._slot(username)
        self._counts[index] = max(0, self._counts[index] + delta)

    def clear(self, row: int) -> None:
        """Worker `row` holds nothing any more (it died)."""
        start = row * SLOTS * _WIDTH
        self._map[start : start + SLOTS * _WIDTH] = bytes(SLOTS * _WIDTH)

    def close(self) -> None:
        self._counts.release()
        self._map.close()
