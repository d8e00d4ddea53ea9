"""Signaling through a fleet (`--redis`): relayed signals/s, latency and CPU per signal when the
two peers of each room are on one instance and when they are on two instances sharing Redis
(`make bench-fleet`, bench/README.md).

Three set-ups, each a fresh set of processes, taking turns run after run (interleaved, the
median of --runs is reported):

- one:       one p2pserver, SQLite (no --redis): the single-instance path as it is;
- one+redis: one p2pserver with --redis, both peers on it (the fleet is there but unused);
- two+redis: two p2pservers with --redis, one peer of each room on each: every signal goes
             instance -> Redis (PUBLISH to the other's inbox) -> instance.

p2pserver processes share core 0, the Node load generator (bench/signaling_load.mjs, relay
mode: 50 rooms of 2, 8 signals in flight per peer, a closed loop) has core 1, redis-server is
not pinned. CPU per signal adds up every server process and redis-server over the measured
run: what one relayed signal costs the machine. Loopback only; every run is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from signaling import P2PSERVER, Server, cpu_seconds, free_port, generator, install_node_packages

SETUPS = ("one", "one+redis", "two+redis")


@contextlib.contextmanager
def redis_server(work: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    program = shutil.which("redis-server")
    if program is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    command = [program, "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
    command += ["--appendonly", "no", "--dir", str(work)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True, check=False
            ).stdout.strip()
            != "PONG"
        ):
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", process
    finally:
        process.kill()
        process.wait(10)


def run(work: Path, setup: str, args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        extra: list[str] = []
        pids: list[int] = []
        if setup != "one":
            url, redis = stack.enter_context(redis_server(work))
            extra = [f"--redis={url}"]
            pids.append(redis.pid)
        servers = [Server("p2p", work, extra, [str(P2PSERVER)])]
        stack.callback(servers[0].stop)
        if setup == "two+redis":
            servers.append(Server("p2p", work, extra, [str(P2PSERVER)]))
            stack.callback(servers[1].stop)
        pids += [server.process.pid for server in servers]
        options: dict[str, object] = {"rooms": args.rooms, "duration": args.duration}
        if len(servers) == 2:
            options["second"] = servers[1].url
        cpu, start = sum(map(cpu_seconds, pids)), time.monotonic()
        process = generator(work, "relay", servers[0], **options)
        out, _ = process.communicate(timeout=180)
        used = sum(map(cpu_seconds, pids)) - cpu
        elapsed = time.monotonic() - start
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        if "error" in result:
            raise RuntimeError(f"generator: {result['error']}")
        # Set-up and warm-up included: the CPU per signal is over the whole run, at its rate.
        result["cpu_us_per_signal"] = used / (result["signals_per_s"] * elapsed) * 1e6
        result["tracebacks"] = sum(len(server.tracebacks()) for server in servers)
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per set-up (3)")
    parser.add_argument("--rooms", type=int, default=50, help="rooms of 2 (50)")
    parser.add_argument("--duration", type=float, default=5.0, help="relay window, s (5)")
    args = parser.parse_args()
    results: dict[str, list[dict[str, Any]]] = {setup: [] for setup in SETUPS}
    with tempfile.TemporaryDirectory(prefix="p2p-fleet-bench-") as folder:
        work = Path(folder)
        install_node_packages(work)
        for i in range(args.runs):
            order = SETUPS if i % 2 == 0 else SETUPS[::-1]
            for setup in order:
                result = run(work, setup, args)
                print(f"run {i + 1} {setup}: {result}", file=sys.stderr)
                results[setup].append(result)

    def med(setup: str, key: str) -> float:
        return statistics.median(r[key] for r in results[setup])

    base = med("one", "signals_per_s")
    print(f"\n{args.rooms} rooms of 2, median of {args.runs} interleaved runs\n")
    print("| set-up | signals relayed/s | vs one | p50 ms | p99 ms | CPU µs per signal |")
    print("|---|---|---|---|---|---|")
    for setup in SETUPS:
        rate = med(setup, "signals_per_s")
        print(
            f"| {setup} | {rate:,.0f} | {rate / base:.2f}x | {med(setup, 'p50_ms'):.1f} "
            f"| {med(setup, 'p99_ms'):.1f} | {med(setup, 'cpu_us_per_signal'):.1f} |"
        )
    tracebacks = sum(r["tracebacks"] for rs in results.values() for r in rs)
    print(f"\np2pserver tracebacks in the logs: {tracebacks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
