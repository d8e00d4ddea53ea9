"""Run by test_workers.py inside a network namespace that has only loopback: relay to relay
through an --external-ip that nothing on this host answers (a NAT that does not hairpin).

`python hairpin_relay.py WORKERS WORKDIR` starts `p2pserver --turn-workers WORKERS
--external-ip 198.51.100.7`, makes two aioice TURN allocations (with 2 workers, one on each),
has each send to the other's relayed address (198.51.100.7:port) until both hear each other,
and prints one JSON line: what each got, from where, and the server's counters. In this
namespace 198.51.100.7 has no route, so a datagram sent there could not leave: it would fail
and be counted in peer_send_drops.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from aioice.turn import create_turn_endpoint

EXTERNAL = "198.51.100.7"  # TEST-NET-2 (RFC 5737): never a real host
LOCALHOST = "127.0.0.1"
MIDDLE = 57344  # the default relay range 49152-65535 cut in two (workers.slices)
TIMEOUT = 30.0


class Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr[:2]))


def no_route_to_external() -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((EXTERNAL, 9))  # asks the routing table; sends nothing
        except OSError as exc:
            return exc.errno == errno.ENETUNREACH
    return False


def get(url: str) -> dict[str, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        return dict(json.load(response))


async def run(workers: int, workdir: Path) -> dict[str, Any]:
    ready = workdir / f"ready-{workers}.json"
    log = (workdir / f"server-{workers}.log").open("wb")
    args = [
        *("--http-host", LOCALHOST, "--http-port", "0", "--db", str(workdir / f"{workers}.db")),
        *("--turn-host", LOCALHOST, "--turn-port", "0", "--turn-workers", str(workers)),
        *("--external-ip", EXTERNAL, "--user", "alice:wonderland", "--no-self-test"),
        *("--ready-file", str(ready)),
    ]
    server = subprocess.Popen([sys.executable, "-m", "p2pserver", *args], stdout=log, stderr=log)
    endpoints: list[Any] = []
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ready.exists():
            assert server.poll() is None and time.monotonic() < deadline, "no ready file"
            await asyncio.sleep(0.05)
        ports = json.loads(ready.read_text())
        chosen: dict[int, tuple[Any, Collector, tuple[str, int]]] = {}
        for _ in range(60):
            turn, collector = await create_turn_endpoint(
                Collector,
                server_addr=(LOCALHOST, ports["udp"]),
                username="alice",
                password="wonderland",
                transport="udp",
            )
            endpoints.append(turn)
            relayed = turn.get_extra_info("sockname")
            slot = len(chosen) if workers == 1 else int(relayed[1] >= MIDDLE)
            chosen.setdefault(slot, (turn, collector, relayed))
            if len(chosen) == 2:
                break
        (a, got_a, relayed_a), (b, got_b, relayed_b) = chosen[0], chosen[1]
        heard: dict[str, tuple[bytes, tuple[str, int]]] = {}
        while len(heard) < 2 and time.monotonic() < deadline:
            # Each side's first datagrams find no permission at the other end yet: resend.
            a.sendto(b"from a", relayed_b)
            b.sendto(b"from b", relayed_a)
            await asyncio.sleep(0.1)
            for name, collector in (("a", got_a), ("b", got_b)):
                while not collector.queue.empty():
                    heard[name] = collector.queue.get_nowait()
        stats = get(f"http://{LOCALHOST}:{ports['http']}/healthz")["turn"]["stats"]
        return {
            "no_route": no_route_to_external(),
            "relayed": [list(relayed_a), list(relayed_b)],
            "heard": {name: [data.decode(), list(addr)] for name, (data, addr) in heard.items()},
            "stats": stats,
        }
    finally:
        for turn in endpoints:
            turn.close()
        server.terminate()
        server.wait(30)
        log.close()


def main() -> int:
    result = asyncio.run(run(int(sys.argv[1]), Path(sys.argv[2])))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
