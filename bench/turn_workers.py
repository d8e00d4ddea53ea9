"""Relay throughput with 1 and with N TURN worker processes, side by side (bench/README.md).

    .venv/bin/python bench/turn_workers.py                     # 1 and 2 workers, 3 rounds
    .venv/bin/python bench/turn_workers.py --workers 1,2 --rounds 3 --seconds 3 --pairs 8
    .venv/bin/python bench/turn_workers.py --mode peer         # each allocation to a plain peer

Starts `p2pserver --no-http --turn-workers W` on 127.0.0.1 for each W in turn (interleaved,
`--rounds` times), and loads it from `--generators` processes. Each generator holds `--pairs`
pairs of allocations relaying to each other (client A -> relay A -> relay B -> client B, the
relay-to-relay path of two relayed browsers) or, with `--mode peer`, as many allocations each
with a channel to a plain UDP socket of the generator (client A -> relay A -> peer, one relayed
browser), and keeps `--window` ChannelData messages in flight per pair: a closed loop, so the
server sets the pace and nothing piles up in buffers. Each run is bounded by `--seconds` and by
`--count` messages per generator. Reported per W: the median over the rounds of messages/s
delivered to B (or the peer), the server's CPU (main process and workers, % of one core) and
the generators' own CPU, which says whether they were the limit. Loopback only.

On a machine with too few cores for the workers and the generators, `--cpu-per-worker F` gives
each worker the same share of one core instead: the server (pinned to the last CPU) runs in a
CPU cgroup of its own whose quota is W x F of a core, the generators run on the other CPUs, and
throughput with 1 and 2 workers can be compared where neither the generators nor the machine
are the limit (needs root and a cgroup v1 `cpu` or v2 `cpu.max` controller).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import selectors
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from turn_relay import CHANNEL, LOCALHOST, TurnClient, cpu_seconds

MIDDLE = 57344  # default relay range cut in two: ports below are worker 0's (workers.slices)
PERIOD_US = 100_000  # the cgroup's CPU accounting period


class CpuQuota:
    """A CPU cgroup with a quota of `cores` of one core, for a server and its workers (children
    stay in their parent's cgroup). Removed on exit."""

    def __init__(self, cores: float) -> None:
        name = f"p2pserver-bench-{os.getpid()}"
        quota = str(int(cores * PERIOD_US))
        if Path("/sys/fs/cgroup/cgroup.controllers").exists():  # v2
            self.path = Path("/sys/fs/cgroup") / name
            self.path.mkdir()
            (self.path / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        else:  # v1
            self.path = Path("/sys/fs/cgroup/cpu") / name
            self.path.mkdir()
            (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(quota)

    def enter(self) -> None:
        """Move the calling process in (from the server's preexec_fn, before exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def throttled_seconds(self) -> float:
        for line in (self.path / "cpu.stat").read_text().splitlines():
            key, value = line.split()
            if key == "throttled_usec":
                return int(value) / 1e6
            if key == "throttled_time":  # v1, in ns
                return int(value) / 1e9
        return 0.0

    def remove(self) -> None:
        for _ in range(50):  # the processes may take a moment to be gone
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def generator(
    port: int,
    mode: str,
    pairs: int,
    size: int,
    window: int,
    seconds: float,
    count: int,
    go: Any,
    out: Any,
    cpus: set[int] | None = None,
) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    links: list[tuple[socket.socket, socket.socket]] = []
    spread = [0, 0, 0]  # allocations in the lower and upper half of the range; pairs across
    for _ in range(pairs):
        a = TurnClient((LOCALHOST, port))
        relayed_a = a.allocate()
        spread[relayed_a[1] >= MIDDLE] += 1
        if mode == "peer":  # the receiving end is a plain UDP socket
            peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            peer.bind((LOCALHOST, 0))
            a.channel_bind(peer.getsockname())
            links.append((a.sock, peer))
            continue
        b = TurnClient((LOCALHOST, port))
        relayed_b = b.allocate()
        spread[relayed_b[1] >= MIDDLE] += 1
        spread[2] += (relayed_a[1] >= MIDDLE) != (relayed_b[1] >= MIDDLE)
        a.channel_bind(relayed_b)
        b.channel_bind(relayed_a)
        links.append((a.sock, b.sock))
    frame = struct.pack("!HH", CHANNEL, size) + bytes(size)
    selector = selectors.DefaultSelector()
    for index, (a_sock, b_sock) in enumerate(links):
        a_sock.setblocking(False)
        b_sock.setblocking(False)
        selector.register(b_sock, selectors.EVENT_READ, index)
    out.put(("ready", spread))
    go.wait()
    cpu0, start = time.process_time(), time.monotonic()
    end = start + seconds
    delivered = sent = 0
    for a_sock, _ in links:
        for _ in range(window):
            a_sock.send(frame)
            sent += 1
    while delivered < count and time.monotonic() < end:
        events = selector.select(0.05)
        if not events:  # losses starved the loop: put the window back in flight
            for a_sock, _ in links:
                for _ in range(window):
                    a_sock.send(frame)
                    sent += 1
            continue
        for key, _ in events:
            b_sock = key.fileobj
            a_sock = links[key.data][0]
            while True:
                try:
                    b_sock.recv(65536)  # type: ignore[union-attr]
                except BlockingIOError:
                    break
                delivered += 1
                try:
                    a_sock.send(frame)
                    sent += 1
                except BlockingIOError:
                    pass
    elapsed = time.monotonic() - start
    out.put(("done", delivered, sent, elapsed, time.process_time() - cpu0))


def family_cpu(pid: int) -> float:
    """CPU seconds of a process and its children (the TURN workers)."""
    total = cpu_seconds(pid) or 0.0
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        for child in children.read_text().split():
            total += cpu_seconds(int(child)) or 0.0
    return total


def one_run(workers: int, args: argparse.Namespace) -> dict[str, Any]:
    quota, server_cpus, generator_cpus = None, None, None
    if args.cpu_per_worker:
        cpus = sorted(os.sched_getaffinity(0))
        server_cpus, generator_cpus = {cpus[-1]}, set(cpus[:-1])
        quota = CpuQuota(workers * args.cpu_per_worker)

    def enter() -> None:  # in the server's process, before exec
        if quota is not None:
            quota.enter()
        if server_cpus:
            os.sched_setaffinity(0, server_cpus)

    try:
        return _one_run(workers, args, enter, quota, generator_cpus)
    finally:
        if quota is not None:
            quota.remove()


def _one_run(
    workers: int,
    args: argparse.Namespace,
    enter: Any,
    quota: CpuQuota | None,
    generator_cpus: set[int] | None,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready.json"
        server = subprocess.Popen(
            [
                sys.executable, "-m", "p2pserver", "--no-http", "--log-level", "warning",
                "--turn-host", LOCALHOST, "--turn-port", "0", "--ready-file", str(ready),
                "--turn-workers", str(workers), "--user", "bench:bench", "--no-self-test",
                "--allow-peer", "127.0.0.0/8", "--user-quota", "0",
            ],
            preexec_fn=enter,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not ready.exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("p2pserver did not start")
                time.sleep(0.05)
            port = json.loads(ready.read_text())["udp"]
            context = multiprocessing.get_context("fork")
            go, out = context.Event(), context.Queue()
            procs = [
                context.Process(
                    target=generator,
                    args=(
                        port,
                        args.mode,
                        args.pairs,
                        args.size,
                        args.window,
                        args.seconds,
                        args.count,
                        go,
                        out,
                        generator_cpus,
                    ),
                )
                for _ in range(args.generators)
            ]
            for proc in procs:
                proc.start()
            spread = [0, 0, 0]
            for _ in procs:
                _, got = out.get(timeout=60)
                spread = [mine + theirs for mine, theirs in zip(spread, got, strict=True)]
            cpu0 = family_cpu(server.pid)
            throttled0 = quota.throttled_seconds() if quota is not None else 0.0
            go.set()
            results = [out.get(timeout=args.seconds + 60) for _ in procs]
            server_cpu = family_cpu(server.pid) - cpu0
            throttled = quota.throttled_seconds() - throttled0 if quota is not None else 0.0
            for proc in procs:
                proc.join(10)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
    elapsed = max(r[3] for r in results)
    return {
        "workers": workers,
        "delivered_pps": sum(r[1] for r in results) / elapsed,
        "sent_pps": sum(r[2] for r in results) / elapsed,
        "server_cpu": 100 * server_cpu / elapsed,
        "generator_cpu": 100 * sum(r[4] for r in results) / elapsed,
        "allocations_per_worker_slice": spread[:2] if workers == 2 else [sum(spread[:2])],
        # relay mode: pairs whose two allocations are in different workers' slices
        "pairs_across_workers": spread[2] if workers == 2 else 0,
        "throttled_s": throttled,  # time the quota held the server back (--cpu-per-worker)
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="worker counts to compare (1,2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; median (3)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of a run (3)")
    parser.add_argument("--count", type=int, default=1_000_000, help="most messages/generator")
    parser.add_argument("--generators", type=int, default=2, help="generator processes (2)")
    parser.add_argument("--pairs", type=int, default=8, help="allocation pairs/generator (8)")
    parser.add_argument("--window", type=int, default=16, help="in flight per pair (16)")
    parser.add_argument("--size", type=int, default=160, help="payload bytes (160)")
    parser.add_argument(
        "--mode",
        choices=("relay", "peer"),
        default="relay",
        help="relay: allocation pairs relaying to each other; peer: each allocation to a plain "
        "UDP socket (relay)",
    )
    parser.add_argument(
        "--cpu-per-worker",
        type=float,
        default=0.0,
        metavar="F",
        help="give each worker F of one core (a cgroup CPU quota; the server on the last CPU, "
        "the generators on the others), for machines with too few cores (off)",
    )
    args = parser.parse_args(argv)
    if args.cpu_per_worker and not 0 < args.cpu_per_worker <= 1:
        parser.error("--cpu-per-worker is a fraction of one core: 0-1")
    counts = [int(w) for w in args.workers.split(",")]
    runs: dict[int, list[dict[str, Any]]] = {w: [] for w in counts}
    for round_ in range(args.rounds):
        for workers in counts:
            result = one_run(workers, args)
            runs[workers].append(result)
            print(f"round {round_ + 1}: {json.dumps(result)}", file=sys.stderr)
    print(f"cpus usable: {len(os.sched_getaffinity(0))}; payload {args.size} B; "
          f"{args.generators} generators x {args.pairs} pairs x window {args.window}; "
          f"mode {args.mode}; CPU per worker {args.cpu_per_worker or 'not limited'}")  # fmt: skip
    print(
        "| workers | delivered msg/s (median) | runs | server CPU % | generators CPU % "
        "| quota throttled s |"
    )
    print("|---:|---:|---|---:|---:|---:|")
    for workers, results in runs.items():
        median = statistics.median(r["delivered_pps"] for r in results)
        every = ", ".join(f"{r['delivered_pps']:,.0f}" for r in results)
        cpu = statistics.median(r["server_cpu"] for r in results)
        gen = statistics.median(r["generator_cpu"] for r in results)
        held = statistics.median(r["throttled_s"] for r in results)
        print(f"| {workers} | {median:,.0f} | {every} | {cpu:.0f} | {gen:.0f} | {held:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
