"""Signaling benchmark: p2pserver and PeerJS server side by side (`make bench-signaling`).

Installs PeerJS server (npm `peer` 1.x) and the generator's `ws` into a temporary folder, then
runs each server pinned to one core (taskset) and one Node load generator
(bench/signaling_load.mjs) pinned to the other, over loopback only. Runs are interleaved
(p2pserver and PeerJS take turns, the order alternating), every figure is the median of
--runs runs, and each run starts a fresh server. Figures:

- relayed signals/s and p99 latency at 50 and 500 rooms of 2 (~300 B frames, 8 in flight per
  peer, a closed loop: each signal received is answered with the next one);
- peers connected and ready per second (2,000 peers, 64 in flight; for p2pserver create-chat +
  WebSocket + join + welcome, for PeerJS WebSocket + OPEN), and failed joins at 64 and 256
  in flight;
- server RSS per idle connected peer (5,000 peers held, minus the RSS after a warm-up).

The machine is small and may be shared: compare the ratios within one invocation, not the
absolute figures across invocations.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GENERATOR = HERE / "signaling_load.mjs"
P2PSERVER = Path(sys.executable).with_name("p2pserver")
NPM_PACKAGES = ("peer@1", "ws@8")
SERVER_CORE, GENERATOR_CORE = "0", "1"
LIMITS = (  # p2pserver's per-address limits are meant for the public; one generator is many users
    "--ws-connections-per-ip=1000000",
    "--ws-messages-per-second=1000000",
    "--rooms-per-minute=100000000",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def install_node_packages(folder: Path) -> None:
    subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", *NPM_PACKAGES],
        cwd=folder,
        check=True,
        timeout=300,
        stdout=subprocess.DEVNULL,
    )
    shutil.copy(GENERATOR, folder / GENERATOR.name)  # so its `import "ws"` resolves there


class Server:
    """One server process pinned to SERVER_CORE; stopped by its own PID."""

    def __init__(self, kind: str, work: Path, extra: list[str], command: list[str]) -> None:
        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / f"{kind}-{self.port}.log"
        if kind == "p2p":
            db = work / f"rooms-{self.port}.db"
            command = [
                *command,
                "--no-turn",
                "--http-host=127.0.0.1",
                f"--http-port={self.port}",
                f"--db={db}",
                "--log-level=warning",
                *LIMITS,
                *extra,
            ]
            ready = "/healthz"
        else:
            command = [
                "node",
                str(work / "node_modules/peer/dist/bin/peerjs.js"),
                "--host=127.0.0.1",
                f"--port={self.port}",
                "--concurrent_limit=1000000",
            ]
            ready = "/"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                ["taskset", "-c", SERVER_CORE, *command], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(self.url + ready, timeout=2):
                    break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} did not start: {self.log.read_text()}") from None
                time.sleep(0.1)

    def tracebacks(self) -> list[str]:
        """The last line of each traceback in the server's log (the exception)."""
        found, lines = [], self.log.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if line.startswith("Traceback"):
                ends = [j for j in range(i + 1, len(lines)) if not lines[j].startswith(" ")]
                found.append(lines[ends[0]] if ends else line)
        return found

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def running(kind: str, work: Path, extra: list[str], command: list[str]) -> Iterator[Server]:
    server = Server(kind, work, extra, command)
    try:
        yield server
    finally:
        server.stop()


def generator(work: Path, mode: str, server: Server, **options: object) -> subprocess.Popen[str]:
    args = [f"{key}={value}" for key, value in options.items()]
    return subprocess.Popen(
        [
            "taskset",
            "-c",
            GENERATOR_CORE,
            "node",
            GENERATOR.name,
            mode,
            server.kind,
            server.url,
            *args,
        ],
        cwd=work,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def run_generator(work: Path, mode: str, server: Server, **options: object) -> dict[str, Any]:
    cpu, start = cpu_seconds(server.process.pid), time.monotonic()
    process = generator(work, mode, server, **options)
    out, _ = process.communicate(timeout=180)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    if "error" in result:
        raise RuntimeError(f"generator: {result['error']}")
    # The server's share of a core over the whole run (set-up included): below ~0.9 the server
    # was not what set the pace.
    result["server_cpu"] = (cpu_seconds(server.process.pid) - cpu) / (time.monotonic() - start)
    return result


def idle_rss(work: Path, server: Server, peers: int) -> dict[str, Any]:
    process = generator(work, "idle", server, peers=peers)
    assert process.stdin is not None and process.stdout is not None
    try:
        assert json.loads(process.stdout.readline())["state"] == "warm"
        before = rss_kib(server.process.pid)
        process.stdin.write("go\n")
        process.stdin.flush()
        held = json.loads(process.stdout.readline())
        after = rss_kib(server.process.pid)
        process.stdin.write("done\n")
        process.stdin.flush()
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return {
        "held": held["held"],
        "failures": held["failures"],
        "kib_per_peer": (after - before) / max(1, held["held"]),
        "rss_before_kib": before,
        "rss_after_kib": after,
    }


Figure = Callable[[Path, Server], dict[str, Any]]


def figures(args: argparse.Namespace) -> dict[str, Figure]:
    d = args.duration

    def relay(rooms: int) -> Figure:
        return lambda work, server: run_generator(
            work, "relay", server, rooms=rooms, in_flight=8, payload=300, duration=d
        )

    def connect(in_flight: int) -> Figure:
        return lambda work, server: run_generator(
            work, "connect", server, peers=args.peers, in_flight=in_flight
        )

    return {
        "relay-50": relay(50),
        "relay-500": relay(500),
        "connect-64": connect(64),
        "connect-256": connect(256),
        "idle": lambda work, server: idle_rss(work, server, args.idle_peers),
    }


def median(results: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in results)


def report(all_results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    rows = []

    def row(name: str, figure: str, key: str, fmt: str, ratio: bool = True) -> None:
        if figure not in all_results:
            return
        peer = median(all_results[figure]["peerjs"], key)
        ours = median(all_results[figure]["p2p"], key)
        share = f"{ours / peer:.2f}x" if ratio and peer else ""
        rows.append(f"| {name} | {fmt.format(peer)} | {fmt.format(ours)} | {share} |")

    row("signals relayed/s, 50 rooms of 2", "relay-50", "signals_per_s", "{:,.0f}")
    row("signals relayed/s, 500 rooms of 2", "relay-500", "signals_per_s", "{:,.0f}")
    row("p99 latency at 50 rooms, ms", "relay-50", "p99_ms", "{:.0f}", ratio=False)
    row("p99 latency at 500 rooms, ms", "relay-500", "p99_ms", "{:.0f}", ratio=False)
    row("peers ready/s (2,000, 64 in flight)", "connect-64", "ready_per_s", "{:,.0f}")
    row("peers ready/s (2,000, 256 in flight)", "connect-256", "ready_per_s", "{:,.0f}")
    row("RSS per idle peer, KiB", "idle", "kib_per_peer", "{:.1f}")
    lines = ["| figure | PeerJS server | p2pserver | ratio |", "|---|---|---|---|", *rows]
    for figure in ("connect-64", "connect-256"):
        if figure in all_results:
            failed = [r["failed"] for r in all_results[figure]["p2p"]]
            lines.append(f"\np2pserver failed joins, {figure}: {failed} (per run)")
    for figure, kinds in all_results.items():
        cpu = [r.get("generator_cpu") for r in kinds["peerjs"] + kinds["p2p"]]
        busy = [c for c in cpu if c is not None and c > 0.9]
        if busy:
            lines.append(f"generator above 90 % CPU in {len(busy)} of {len(cpu)} {figure} runs")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per figure and server (3)")
    parser.add_argument("--duration", type=float, default=5.0, help="relay window, s (5)")
    parser.add_argument("--peers", type=int, default=2000, help="peers per connect run (2000)")
    parser.add_argument("--idle-peers", type=int, default=5000, help="idle peers held (5000)")
    parser.add_argument("--only", action="append", help="run only this figure (repeatable)")
    parser.add_argument(
        "--p2p-arg", action="append", default=[], help="extra p2pserver flag (repeatable)"
    )
    parser.add_argument(
        "--p2p-command",
        type=str.split,
        default=[str(P2PSERVER)],
        help="how to start p2pserver (default: this environment's p2pserver)",
    )
    parser.add_argument("--json", type=Path, help="also write every run's results here")
    args = parser.parse_args()
    if os.cpu_count() is None or os.cpu_count() < 2:  # type: ignore[operator]
        print("needs two cores: one for the server, one for the generator", file=sys.stderr)
        return 1
    chosen = figures(args)
    if args.only:
        chosen = {name: chosen[name] for name in args.only}
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    tracebacks: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-signaling-") as tmp:
        work = Path(tmp)
        install_node_packages(work)
        for run in range(args.runs):
            for name, figure in chosen.items():
                order = ("p2p", "peerjs") if run % 2 == 0 else ("peerjs", "p2p")
                for kind in order:
                    with running(kind, work, args.p2p_arg, args.p2p_command) as server:
                        result = figure(work, server)
                        if kind == "p2p":
                            tracebacks += server.tracebacks()
                    print(f"run {run + 1} {name} {kind}: {json.dumps(result)}", flush=True)
                    results.setdefault(name, {}).setdefault(kind, []).append(result)
    print()
    print(report(results))
    print(f"\np2pserver tracebacks in its log: {len(tracebacks)}")
    for line, count in collections.Counter(tracebacks).most_common():
        print(f"  {count} x {line}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
