"""The pieces of the worker supervisor that need no process: relay slices, quota shares, and
the shared user-quota table (turn/quota.py) seen from several workers."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from p2pserver.config import Settings
from p2pserver.turn import quota
from p2pserver.turn.allocation import AllocationTable
from p2pserver.turn.workers import shares, slices


def test_slices_cover_the_range_without_overlap() -> None:
    assert slices((49152, 65535), 2) == [(49152, 57343), (57344, 65535)]
    assert slices((50000, 50004), 3) == [(50000, 50001), (50002, 50003), (50004, 50004)]
    for count in (1, 2, 3, 7):
        parts = slices((1000, 1999), count)
        ports = [p for low, high in parts for p in range(low, high + 1)]
        assert ports == list(range(1000, 2000))


def test_shares_add_up_to_the_limit() -> None:
    assert shares(10000, 4) == [2500] * 4
    assert shares(3, 2) == [2, 1]
    assert sum(shares(10001, 3)) == 10001


@pytest.fixture
def table_fd() -> Iterator[int]:
    fd = quota.create(3)
    yield fd
    os.close(fd)


def test_each_worker_sees_the_others_counts(table_fd: int) -> None:
    key = b"k" * 16
    views = [quota.SharedUserCounts(table_fd, 3, me, key) for me in range(3)]
    views[0].add("alice", 1)
    views[1].add("alice", 2)
    assert [v.elsewhere("alice") for v in views] == [2, 1, 3]
    assert views[2].elsewhere("bob") == 0
    views[1].add("alice", -2)
    assert views[2].elsewhere("alice") == 1
    views[2].clear(0)  # worker 0 died: its allocations no longer count
    assert views[1].elsewhere("alice") == 0
    for view in views:
        view.close()


def test_the_allocation_table_counts_users_across_workers(table_fd: int) -> None:
    key = os.urandom(16)
    here = quota.SharedUserCounts(table_fd, 3, 0, key)
    there = quota.SharedUserCounts(table_fd, 3, 1, key)
    table = AllocationTable(user_quota=2, max_allocations=10, elsewhere=here)
    assert table.quota_error("alice") is None
    there.add("alice", 2)  # alice holds two allocations on worker 1
    assert table.quota_error("alice") == 486
    assert table.quota_error("bob") is None
    there.add("alice", -1)
    assert table.quota_error("alice") is None
    here.close()
    there.close()


def test_cli_default_is_the_cpus_this_process_may_use() -> None:
    from p2pserver.cli import parse_settings

    assert parse_settings(["--no-http"], {}).turn_workers == len(os.sched_getaffinity(0))
    assert parse_settings(["--no-http"], {"P2P_TURN_WORKERS": "3"}).turn_workers == 3
    assert Settings().turn_workers == 1  # embedded servers and tests: in process
    with pytest.raises(SystemExit):
        parse_settings(["--no-http", "--turn-workers", "0"], {})
    with pytest.raises(SystemExit):
        parse_settings(["--no-http", "--turn-workers", "3", "--relay-ports", "50000-50001"], {})
