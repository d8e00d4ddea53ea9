"""CPU time of the TURN control path in-process: Binding, the 401 challenge, an allocation's life.

    .venv/bin/python bench/turn_control.py              # µs per operation, CPU time
    .venv/bin/python bench/turn_control.py --profile allocate   # where that time goes (cProfile)

Each case calls `TurnCore.handle` the way a listener does (fake relays, no sockets): a plain
Binding request; an unsigned Allocate (the 401 challenge every client gets first); and 401 +
signed Allocate + Refresh(LIFETIME 0), the life of one allocation. Requests are built before
the clock starts. Figures are CPU time of this process (time.process_time), so other work on a
shared machine does not count. See bench/README.md.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path

from aioice.stun import Class, Method

from p2pserver.config import Settings
from p2pserver.turn.handlers import Client, TurnCore
from p2pserver.turn.policy import PeerPolicy
from p2pserver.turn.stun import TurnMessage as Message

sys.path.insert(0, str(Path(__file__).parent))
from turn_expiry import FakeRelays

KEY = hashlib.md5(b"u:r:p").digest()
COUNTS = {"binding": 100_000, "challenge": 30_000, "allocate": 5_000}


def signed(method: Method, attrs: dict[str, object], nonce: bytes) -> bytes:
    message = Message(method, Class.REQUEST, None, dict(attrs))
    message.attributes.update({"USERNAME": "u", "REALM": "r", "NONCE": nonce})
    message.add_message_integrity(KEY)
    return bytes(message)


def case(name: str) -> tuple[Callable[[], None], int]:
    """(a call doing `count` operations, count)."""
    settings = Settings(http=False, users=(("u", "p"),), realm="r", user_quota=0)
    core = TurnCore(settings, FakeRelays(), PeerPolicy())  # type: ignore[arg-type]
    client = Client("udp", ("127.0.0.1", 4000), ("127.0.0.1", 3478), lambda data: None)
    count = COUNTS[name]
    binding = bytes(Message(Method.BINDING, Class.REQUEST))
    allocate = {"REQUESTED-TRANSPORT": 0x11000000}
    unsigned = bytes(Message(Method.ALLOCATE, Class.REQUEST, None, dict(allocate)))
    if name == "binding":

        def run() -> None:
            for _ in range(count):
                core.handle(binding, client)

    elif name == "challenge":

        def run() -> None:
            for _ in range(count):
                core.handle(unsigned, client)

    else:
        nonce = core.nonces.issue("127.0.0.1", time.time())
        lives = [
            (
                Client("udp", ("127.0.0.1", 10000 + i), ("127.0.0.1", 3478), lambda data: None),
                signed(Method.ALLOCATE, allocate, nonce),
                signed(Method.REFRESH, {"LIFETIME": 0}, nonce),
            )
            for i in range(count)
        ]

        def run() -> None:
            for each, allocation, delete in lives:
                core.handle(unsigned, each)
                assert core.handle(allocation, each)[1] == 0x03  # type: ignore[index]
                core.handle(delete, each)

    return run, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs; the median is kept (3)")
    parser.add_argument("--profile", choices=sorted(COUNTS), help="cProfile one case instead")
    args = parser.parse_args(argv)
    if args.profile:
        run, _ = case(args.profile)
        profiler = cProfile.Profile()
        profiler.runcall(run)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
        return 0
    print("| operation | µs CPU per operation |")
    print("|---|---:|")
    labels = {
        "binding": "Binding request -> success",
        "challenge": "unsigned Allocate -> 401 challenge",
        "allocate": "401 + Allocate + Refresh(0): one allocation's life",
    }
    for name in COUNTS:
        runs = []
        for _ in range(max(1, args.repeat)):
            run, count = case(name)
            began = time.process_time()
            run()
            runs.append((time.process_time() - began) / count)
        runs.sort()
        print(f"| {labels[name]} | {1e6 * runs[len(runs) // 2]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
