"""The largest stall the TURN core's expiry timers cause, in-process (no sockets).

    .venv/bin/python bench/turn_expiry.py                 # 10,000 allocations x 128 permissions
    .venv/bin/python bench/turn_expiry.py --allocations 2000 --permissions 32

It fills a TurnCore with allocations (Allocate through `TurnCore.handle`, fake relays) that each
hold `--permissions` permissions, then drives its timers through a whole lifetime and times every
call: the old one-second sweep (`TurnCore.expire`, when the core has no `handle_timers`) or the
deadline-driven `handle_timers(now)` at each `next_deadline()`. Two shapes: allocations made
over 300 s (the steady state of a busy server: each second a few expire) and all in the same
second (the worst case: everything expires at once). Every call is one stall of the event loop.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from aioice.stun import Class, Method

from p2pserver.config import Settings
from p2pserver.turn.handlers import Client, TurnCore
from p2pserver.turn.policy import PeerPolicy
from p2pserver.turn.stun import TurnMessage as Message

START = 1_000_000.0  # a monotonic time; the wall clock is passed alongside where it is needed
WALL = 1_800_000_000.0


class FakeRelay:
    family = 1
    dropped = 0

    def __init__(self, port: int) -> None:
        self.address = ("192.0.2.1", port)

    def start(self, on_datagram: Callable[[bytes, tuple[str, int]], None]) -> None:
        pass

    def sendto(self, data: bytes, peer: tuple[str, int]) -> None:
        pass

    def close(self) -> None:
        pass


class FakeRelays:
    families = frozenset({1})

    def __init__(self) -> None:
        self.port = 0

    def open(self, family: int, **flags: Any) -> tuple[FakeRelay, None]:
        self.port += 1
        return FakeRelay(self.port), None

    def take_reserved(self, token: bytes) -> None:
        return None

    def expire(self, now: float) -> None:
        pass

    def next_deadline(self) -> float | None:
        return None


def handle(core: TurnCore, data: bytes, client: Client, now: float) -> bytes | None:
    if hasattr(core, "handle_timers"):
        return core.handle(data, client, now, WALL + (now - START))
    return core.handle(data, client, WALL + (now - START))  # before: one clock, the wall's


def fill(allocations: int, permissions: int, spread: float) -> tuple[TurnCore, float]:
    settings = Settings(
        http=False,
        users=(("u", "p"),),
        realm="r",
        user_quota=0,
        max_allocations=allocations,
        max_permissions=permissions,
    )
    core = TurnCore(settings, FakeRelays(), PeerPolicy())  # type: ignore[arg-type]
    key = hashlib.md5(b"u:r:p").digest()
    peers = [f"8.8.{i // 256}.{i % 256}" for i in range(permissions)]
    for i in range(allocations):
        now = START + spread * i / allocations
        client = Client(
            "udp", (f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 5000), ("192.0.2.1", 3478), id
        )
        message = Message(Method.ALLOCATE, Class.REQUEST, None, {})
        message.attributes["REQUESTED-TRANSPORT"] = 0x11000000
        message.attributes["USERNAME"] = "u"
        message.attributes["REALM"] = "r"
        message.attributes["NONCE"] = core.nonces.issue(client.remote[0], WALL + (now - START))
        message.add_message_integrity(key)
        handle(core, bytes(message), client, now)
        allocation = core.table.get(client.five_tuple)
        assert allocation is not None, "Allocate failed"
        for ip in peers:
            allocation.permit(ip, now)
        if hasattr(core.table, "reschedule"):  # what CreatePermission does after permit()
            core.table.reschedule(allocation)
    return core, START + spread


def timed(call: Callable[[], object]) -> tuple[float, float]:
    """(CPU seconds of this thread, wall seconds) one call took. The CPU time is the stall the
    code causes; the wall time adds whatever else the (shared) machine ran meanwhile."""
    cpu, wall = time.thread_time(), time.perf_counter()
    call()
    return time.thread_time() - cpu, time.perf_counter() - wall


def drive(core: TurnCore, until: float) -> list[tuple[float, float]]:
    """Run the timers from START to `until` (virtual time, 10 ms steps); (CPU, wall) seconds
    per call."""
    stalls: list[tuple[float, float]] = []
    now = START
    gc.collect()
    gc.disable()  # a collection would land in whichever call runs then; time the timers only
    try:
        if not hasattr(core, "handle_timers"):  # before: a sweep every second
            while now <= until:
                stalls.append(timed(partial(core.expire, WALL + (now - START))))  # type: ignore[attr-defined]
                now += 1.0
            return stalls
        while now <= until:
            deadline = core.next_deadline()
            while deadline is not None and deadline <= now:
                stalls.append(timed(partial(core.handle_timers, now)))
                deadline = core.next_deadline()
            now += 0.01
        return stalls
    finally:
        gc.enable()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--allocations", type=int, default=10_000)
    parser.add_argument("--permissions", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=1, help="runs; the median is reported")
    args = parser.parse_args(argv)
    if not (0 < args.allocations <= 100_000 and 0 < args.permissions <= 1000):
        parser.error("--allocations 1-100000, --permissions 1-1000")
    print("| shape | timer calls | largest stall, CPU ms | p99 CPU ms | largest, wall ms ", end="")
    print("| total CPU ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for shape, spread in (("made over 300 s", 300.0), ("made at once", 0.0)):
        runs = []
        for _ in range(args.repeat):
            core, _ = fill(args.allocations, args.permissions, spread)
            stalls = drive(core, START + spread + 700)  # past every lifetime (600 s)
            assert len(core.table) == 0, "allocations outlived their lifetime"
            runs.append(stalls)
            largest = max(cpu for cpu, _ in stalls)
            print(f"  ran: largest {1000 * largest:.2f} ms CPU", file=sys.stderr, flush=True)
            del core
        runs.sort(key=lambda run: max(cpu for cpu, _ in run))
        stalls = runs[len(runs) // 2]
        cpus = sorted(cpu for cpu, _ in stalls)
        p99 = cpus[min(len(cpus) - 1, int(len(cpus) * 0.99))]
        print(
            f"| {shape} | {len(cpus):,} | {1000 * cpus[-1]:.2f} | {1000 * p99:.2f} "
            f"| {1000 * max(wall for _, wall in stalls):.2f} | {1000 * sum(cpus):,.0f} |"
        )
    print(f"\n(median of {args.repeat} runs; in-process, no sockets)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
