"""p2pserver's TURN on one core, side by side with coturn in the same run (issue 9's figures).

    .venv/bin/python bench/turn_core.py                  # what `make bench` runs (~3 minutes)
    .venv/bin/python bench/turn_core.py --rounds 1 --seconds 1 --skip-http

Each server under test runs pinned to one CPU (the last this process may use), the load
generator on another: a small C program (bench/udpblast.c, built here with `cc`) that sends with
sendmmsg and counts with recvmmsg on sockets this script sets up, because Python cannot outrun
either server; allocations are driven from Python with hand-built messages. Figures:

- STUN Binding round trips/s (8 client sockets, no authentication);
- relay pps, relay to relay: two allocations bound to each other's relayed address by channels,
  ChannelData of 160 and 1200 bytes from A's client, counted as they reach B's client;
- relay pps, one allocation to a plain UDP peer (160 and 1200 bytes), counted at the peer;
- allocations/s: 401, Allocate, Refresh(LIFETIME 0), 64 at a time, each on a new socket;
- for p2pserver with HTTP: `GET /check-chat/{id}` latency, idle and while the relay to relay
  load (160 B) saturates the server (HTTP and TURN share the process: one TURN worker).

p2pserver and coturn alternate within each round (`--rounds`, median reported). The generator's
offered rate, its CPU and the server's CPU and socket drops say which side was the limit.
coturn runs from a config file in a temporary directory (no CLI, no daemon, 127.0.0.1 only)
and, like p2pserver, is only ever signalled by its PID. Loopback only; every load is bounded in
time and count. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import http.client
import json
import os
import random
import selectors
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from turn_relay import (
    PASSWORD,
    USER,
    TurnClient,
    big_buffers,
    cpu_seconds,
    free_port,
    running,
    send_indication,
    udp_drops,
)

LOCALHOST = "127.0.0.1"
COOKIE = 0x2112A442
REALM = "bench"
KEY = hashlib.md5(f"{USER}:{REALM}:{PASSWORD}".encode()).digest()
MAX_PACKETS = 20_000_000  # per load run, besides --seconds


# --- the servers --------------------------------------------------------------------------------


def p2pserver_command(port: int, http_port: int | None, db: Path, workers: int = 1) -> list[str]:
    exe = Path(sys.executable).with_name("p2pserver")
    command = [str(exe) if exe.exists() else "p2pserver", "--turn-host", LOCALHOST]
    command += ["--turn-port", str(port), "--user", f"{USER}:{PASSWORD}", "--realm", REALM]
    command += ["--allow-peer", "127.0.0.0/8", "--user-quota", "0", "--no-self-test"]
    command += ["--log-level", "warning", "--turn-workers", str(workers)]
    if http_port is None:
        return [*command, "--no-http"]
    return [*command, "--http-host", LOCALHOST, "--http-port", str(http_port), "--db", str(db)]


def coturn_command(turnserver: str, port: int, directory: Path) -> list[str]:
    config = directory / "turnserver.conf"
    config.write_text(
        "\n".join(
            [
                "listening-ip=127.0.0.1",
                f"listening-port={port}",
                "relay-ip=127.0.0.1",
                f"user={USER}:{PASSWORD}",
                f"realm={REALM}",
                "lt-cred-mech",
                "allow-loopback-peers",  # coturn 4.6 refuses 127.0.0.0/8 peers without it
                "allowed-peer-ip=127.0.0.1",
                "no-cli",
                # One relay thread, as for one core: with more, the two allocations of relay to
                # relay land on one thread or on two at random, and coturn relays about 200k or
                # about 100k pkt/s from run to run (bench/README.md).
                "relay-threads=1",
                "no-tls",
                "no-dtls",
                "no-stdout-log",
                "log-file=/dev/null",
                f"pidfile={directory / 'turnserver.pid'}",
            ]
        )
        + "\n"
    )
    return [turnserver, "-c", str(config)]  # no -o: it stays in the foreground, our child


@dataclass
class Target:
    name: str
    address: tuple[str, int]
    pid: int


BASELINE = "p2pserver before"  # --baseline-src: an older checkout's p2pserver, for comparison


@contextlib.contextmanager
def serving(
    name: str, cpu: int, http: bool = False, baseline_src: str | None = None, workers: int = 1
) -> Iterator[tuple[Target, int | None]]:
    """Run one server pinned to `cpu`; yields it and its HTTP port (p2pserver with `http`).
    BASELINE runs this venv's p2pserver with the package from `baseline_src` instead."""
    saved = os.environ.get("PYTHONPATH")
    if name == BASELINE and baseline_src:
        os.environ["PYTHONPATH"] = baseline_src  # inherited by the server process only
    try:
        with _serving(name, cpu, http, workers) as served:
            if saved is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = saved
            yield served
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


@contextlib.contextmanager
def _serving(
    name: str, cpu: int, http: bool, workers: int = 1
) -> Iterator[tuple[Target, int | None]]:
    with tempfile.TemporaryDirectory(prefix="bench-turn-") as tmp:
        port = free_port()
        http_port = free_port() if http else None
        if name == "coturn":
            turnserver = shutil.which("turnserver")
            assert turnserver is not None
            command = coturn_command(turnserver, port, Path(tmp))
        else:
            command = p2pserver_command(port, http_port, Path(tmp) / "bench.db", workers)
        with running(command, port, name, {cpu}) as process:
            if http_port is not None:
                wait_for_http(http_port)
            yield Target(name, (LOCALHOST, port), process.pid), http_port


def wait_for_http(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection((LOCALHOST, port), 0.2).close()
            return
        time.sleep(0.05)
    raise RuntimeError(f"no HTTP on port {port}")


# --- the C load generator -----------------------------------------------------------------------


def build_blaster(directory: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("bench/turn_core.py needs a C compiler (apt-get install gcc)")
    exe = directory / "udpblast"
    source = Path(__file__).with_name("udpblast.c")
    subprocess.run([cc, "-O2", "-o", str(exe), str(source)], check=True)
    return exe


@dataclass
class Blast:
    sent: int
    received: int
    seconds: float
    generator_cpu: float  # fraction of its core the generator used
    server_cpu: float | None  # fraction of one core the server used
    server_drops: int  # datagrams the kernel dropped at the server's full sockets
    generator_drops: int  # ... at the generator's sockets

    @property
    def rate(self) -> float:
        return self.received / self.seconds

    @property
    def per_core(self) -> float:
        """Received per CPU-second the server got: what a whole core would carry while the
        server is the limit. On a shared machine the server does not always get its core."""
        if not self.server_cpu:
            return float("nan")
        return self.rate / min(1.0, self.server_cpu)


def blast(
    exe: Path,
    cpu: int,
    senders: list[socket.socket],
    receivers: list[socket.socket],
    message: bytes,
    seconds: float,
    target: Target,
    server_ports: set[int],
    nice: bool = False,
) -> Blast:
    with tempfile.NamedTemporaryFile(prefix="bench-message-") as file:
        file.write(message)
        file.flush()
        fds = [s.fileno() for s in senders], [s.fileno() for s in receivers]
        own_ports = {s.getsockname()[1] for s in senders + receivers}
        drops = udp_drops(server_ports), udp_drops(own_ports)
        cpu_before = cpu_seconds(target.pid)
        began = time.monotonic()
        lists = ",".join(map(str, fds[0])), ",".join(map(str, fds[1]))
        result = subprocess.run(
            [str(exe), str(seconds), str(MAX_PACKETS), *lists, file.name],
            pass_fds=fds[0] + fds[1],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 30,
            preexec_fn=lambda: _pin(cpu, nice),
        )
        wall = time.monotonic() - began
        cpu_after = cpu_seconds(target.pid)
    values = dict(item.split("=") for item in result.stdout.split())
    server_cpu = None
    if cpu_before is not None and cpu_after is not None:
        server_cpu = (cpu_after - cpu_before) / wall
    return Blast(
        sent=int(values["sent"]),
        received=int(values["received"]),
        seconds=float(values["seconds"]),
        generator_cpu=float(values["cpu"]) / float(values["seconds"]),
        server_cpu=server_cpu,
        server_drops=udp_drops(server_ports) - drops[0],
        generator_drops=udp_drops(own_ports) - drops[1],
    )


def _pin(cpu: int, nice: bool) -> None:
    os.sched_setaffinity(0, {cpu})
    if nice:
        os.nice(19)  # leave the CPU to the HTTP client measuring latency next to it


def channel_data(size: int) -> bytes:
    return struct.pack("!HH", 0x4000, size) + bytes(size)


def binding_request() -> bytes:
    return struct.pack("!HHI", 0x0001, 0, COOKIE) + os.urandom(12)


@contextlib.contextmanager
def relay_pair(
    target: Target, channel_b: int = 0x4000
) -> Iterator[tuple[TurnClient, TurnClient, set[int]]]:
    """Two allocations whose clients bound a channel to each other's relayed address: A's
    0x4000, B's `channel_b` (browsers number their channels from 0x4000, so in a call both
    sides' first channel is 0x4000)."""
    a, b = TurnClient(target.address), TurnClient(target.address)
    try:
        relayed_a, relayed_b = a.allocate(), b.allocate()
        a.channel_bind(relayed_b)
        b.channel_bind(relayed_a, channel_b)
        yield a, b, {target.address[1], relayed_a[1], relayed_b[1]}
    finally:
        for client in (a, b):
            client.sock.settimeout(1.0)
            client.refresh_delete()
            client.close()


def relay_to_relay(
    exe: Path, cpu: int, target: Target, size: int, seconds: float, channel_b: int = 0x4000
) -> Blast:
    with relay_pair(target, channel_b) as (a, b, ports):
        return blast(exe, cpu, [a.sock], [b.sock], channel_data(size), seconds, target, ports)


def relay_to_peer(
    exe: Path, cpu: int, target: Target, size: int, seconds: float, indications: bool = False
) -> Blast:
    """One allocation to a plain UDP socket, on a channel, or (`indications`) in Send
    indications after a CreatePermission, as Firefox's TURN client always sends."""
    peer = big_buffers(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    peer.bind((LOCALHOST, 0))
    client = TurnClient(target.address)
    try:
        relayed = client.allocate()
        if indications:
            client.create_permission(peer.getsockname())
            message = send_indication(peer.getsockname(), bytes(size))
        else:
            client.channel_bind(peer.getsockname())
            message = channel_data(size)
        ports = {target.address[1], relayed[1]}
        return blast(exe, cpu, [client.sock], [peer], message, seconds, target, ports)
    finally:
        client.sock.settimeout(1.0)
        client.refresh_delete()
        client.close()
        peer.close()


def bindings(exe: Path, cpu: int, target: Target, seconds: float) -> Blast:
    sockets = []
    for _ in range(8):
        sock = big_buffers(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sock.connect(target.address)
        sockets.append(sock)
    try:
        request = binding_request()
        return blast(exe, cpu, sockets, sockets, request, seconds, target, {target.address[1]})
    finally:
        for sock in sockets:
            sock.close()


# --- allocations/s, from Python with hand-built messages ----------------------------------------


def _attr(atype: int, value: bytes) -> bytes:
    return struct.pack("!HH", atype, len(value)) + value + bytes(-len(value) & 3)


def _message(method: int, txid: bytes, body: bytes, nonce: bytes | None, realm: bytes) -> bytes:
    if nonce is None:
        return struct.pack("!HHI", method, len(body), COOKIE) + txid + body
    body += _attr(0x0006, USER.encode()) + _attr(0x0014, realm) + _attr(0x0015, nonce)
    head = struct.pack("!HHI", method, len(body) + 24, COOKIE) + txid
    mac = hmac.new(KEY, head + body, hashlib.sha1).digest()
    return head + body + _attr(0x0008, mac)


def _find(raw: bytes, wanted: int) -> bytes | None:
    pos = 20
    while pos + 4 <= len(raw):
        atype, length = struct.unpack_from("!HH", raw, pos)
        if atype == wanted:
            return raw[pos + 4 : pos + 4 + length]
        pos += 4 + length + (-length & 3)
    return None


_rng = random.Random(9)
TRANSPORT = _attr(0x0019, bytes((17, 0, 0, 0)))
DELETE = _attr(0x000D, bytes(4))


class Cycle:
    """One client's 401 -> Allocate -> Refresh(0), on a fresh socket each time."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        # A source address of its own: a 5-tuple used again soon after its allocation was
        # deleted gets 437 from coturn, which keeps deleted allocations a while.
        self.sock.bind(
            (f"127.{_rng.randrange(1, 255)}.{_rng.randrange(256)}.{_rng.randrange(1, 255)}", 0)
        )
        self.sock.connect(server)
        self.step = 0
        self.nonce = self.realm = b""
        self.sent_at = time.monotonic()
        self.request = b""
        self.send(_message(0x0003, os.urandom(12), TRANSPORT, None, b""))

    def send(self, request: bytes) -> None:
        self.request = request
        self.sent_at = time.monotonic()
        with contextlib.suppress(BlockingIOError):
            self.sock.send(request)

    def answer(self, raw: bytes) -> bool | None:
        """Take one answer; True when the cycle is complete, None when it failed."""
        if len(raw) < 20 or raw[8:20] != self.request[8:20]:
            return False
        if self.step == 0:
            self.nonce, self.realm = _find(raw, 0x0015) or b"", _find(raw, 0x0014) or b""
            body, method = TRANSPORT, 0x0003
        elif self.step == 1:
            if raw[:2] != b"\x01\x03":
                return None  # e.g. 437 from coturn for a 5-tuple it still remembers
            body, method = DELETE, 0x0004
        else:
            return True
        self.step += 1
        self.send(_message(method, os.urandom(12), body, self.nonce, self.realm))
        return False


def allocations(target: Target, seconds: float, concurrency: int = 64) -> tuple[float, float]:
    """(completed cycles/s, server CPU fraction) with `concurrency` cycles in flight."""
    selector = selectors.DefaultSelector()
    cycles: dict[int, Cycle] = {}

    def start() -> None:
        cycle = Cycle(target.address)
        cycles[cycle.sock.fileno()] = cycle
        selector.register(cycle.sock, selectors.EVENT_READ)

    for _ in range(concurrency):
        start()
    done = failed = 0
    cpu_before, began = cpu_seconds(target.pid), time.monotonic()
    stop = began + seconds
    while (now := time.monotonic()) < stop and done < 1_000_000:
        for key, _ in selector.select(0.05):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            cycle = cycles[sock.fileno()]
            with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                outcome = cycle.answer(sock.recv(2048))
                if outcome is None:
                    failed += 1
                if outcome is not False:
                    done += outcome is True
                    selector.unregister(sock)
                    del cycles[sock.fileno()]
                    sock.close()
                    start()
        for cycle in list(cycles.values()):
            if now - cycle.sent_at > 0.5:  # lost (a full buffer): ask again
                cycle.send(cycle.request)
    elapsed = time.monotonic() - began
    cpu_after = cpu_seconds(target.pid)
    for cycle in cycles.values():
        cycle.sock.close()
    selector.close()
    server_cpu = (cpu_after - cpu_before) / elapsed if cpu_before and cpu_after else float("nan")
    if failed > done // 100:
        raise RuntimeError(f"{failed} of {done + failed} allocations failed on {target.name}")
    return done / elapsed, server_cpu


# --- HTTP latency -------------------------------------------------------------------------------


def check_chat_latencies(port: int, seconds: float, count: int = 5000) -> list[float]:
    connection = http.client.HTTPConnection(LOCALHOST, port, timeout=10)
    connection.request("POST", "/create-chat", body="{}", headers={"Content-Type": "json"})
    room = json.loads(connection.getresponse().read())["roomId"]
    latencies = []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop and len(latencies) < count:
        began = time.perf_counter()
        connection.request("GET", f"/check-chat/{room}")
        response = connection.getresponse()
        response.read()
        latencies.append(time.perf_counter() - began)
        assert response.status == 200
        time.sleep(0.002)  # a page's pace, not a load test of its own
    connection.close()
    return latencies


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def http_under_load(
    exe: Path, generator_cpu: int, server_cpu: int, seconds: float, workers: int = 1
) -> tuple[tuple[float, float], tuple[float, float], Blast]:
    """((p50, p99) idle, (p50, p99) under relay load, the load), in seconds. With `workers`
    >= 2 TURN runs in worker processes and HTTP in the main one (all on the server's CPU)."""
    with serving("p2pserver", server_cpu, http=True, workers=workers) as (target, http_port):
        assert http_port is not None
        os.sched_setaffinity(0, {generator_cpu})
        idle = check_chat_latencies(http_port, seconds)
        with relay_pair(target) as (a, b, ports):
            result: list[Blast] = []
            loaded: list[float] = []

            def load() -> None:
                message = channel_data(160)
                result.append(
                    blast(exe, generator_cpu, [a.sock], [b.sock], message, seconds + 1.0, target,
                          ports, nice=True)
                )  # fmt: skip

            thread = threading.Thread(target=load)
            thread.start()
            time.sleep(0.5)  # the load is on
            loaded = check_chat_latencies(http_port, seconds)
            thread.join(seconds + 60)
        return (
            (percentile(idle, 0.5), percentile(idle, 0.99)),
            (percentile(loaded, 0.5), percentile(loaded, 0.99)),
            result[0],
        )


# --- the report ---------------------------------------------------------------------------------


def median_by(runs: list[Blast]) -> Blast:
    return sorted(runs, key=lambda r: r.rate)[len(runs) // 2]


def fmt_blast(b: Blast) -> str:
    server = f"{100 * b.server_cpu:.0f}" if b.server_cpu is not None else "-"
    return (
        f"{b.rate:,.0f} | {b.per_core:,.0f} | {b.sent / b.seconds:,.0f} "
        f"| {100 * b.generator_cpu:.0f} | {server} | {b.server_drops:,} / {b.generator_drops:,}"
    )


def median_per_core(runs: list[Blast]) -> float:
    return statistics.median(r.per_core for r in runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per load run (2)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds, median (3)")
    parser.add_argument("--skip-coturn", action="store_true")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--skip-allocations", action="store_true")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="run only the load figures whose name contains TEXT (repeatable)",
    )
    parser.add_argument(
        "--http-turn-workers",
        type=int,
        default=1,
        help="--turn-workers of the server in the check-chat figure (1: HTTP and TURN in one "
        "process; 2: TURN in worker processes, HTTP apart)",
    )
    parser.add_argument(
        "--baseline-src",
        help="also run p2pserver with the package in this src directory (an older checkout)",
    )
    args = parser.parse_args(argv)
    if not (0 < args.seconds <= 30 and 0 < args.rounds <= 10):
        parser.error("--seconds 0-30, --rounds 1-10")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs 2 CPUs: one for the server, one for the load generator")
    generator_cpu, server_cpu = cpus[0], cpus[-1]
    os.sched_setaffinity(0, {generator_cpu})
    servers = ["p2pserver"]
    if args.baseline_src:
        servers.append(BASELINE)
    if not args.skip_coturn:
        if shutil.which("turnserver") is None:
            print("no turnserver on PATH (apt-get install coturn): p2pserver alone")
        else:
            servers.append("coturn")
    cases: list[tuple[str, Callable[[Path, Target], Blast]]] = [
        ("STUN Binding round trips/s", lambda e, t: bindings(e, generator_cpu, t, args.seconds)),
    ]
    for size in (160, 1200):
        cases.append(
            (
                f"relay to relay, {size} B ChannelData, pkt/s",
                lambda e, t, s=size: relay_to_relay(e, generator_cpu, t, s, args.seconds),
            )
        )
    cases.append(  # p2pserver then renumbers each frame (docs/turn.md, "Relay to relay")
        (
            "relay to relay, 1200 B, B's channel 0x4001, pkt/s",
            lambda e, t: relay_to_relay(e, generator_cpu, t, 1200, args.seconds, 0x4001),
        )
    )
    for size in (160, 1200):
        cases.append(
            (
                f"one allocation to a plain peer, {size} B, pkt/s",
                lambda e, t, s=size: relay_to_peer(e, generator_cpu, t, s, args.seconds),
            )
        )
    cases.append(
        (
            "one allocation to a plain peer, 160 B Send indications, pkt/s",
            lambda e, t: relay_to_peer(e, generator_cpu, t, 160, args.seconds, indications=True),
        )
    )
    if args.only:
        cases = [case for case in cases if any(text in case[0] for text in args.only)]
    blasts: dict[tuple[str, str], list[Blast]] = {}
    allocs: dict[str, list[tuple[float, float]]] = {}
    http_runs: list[tuple[tuple[float, float], tuple[float, float], Blast]] = []
    with tempfile.TemporaryDirectory(prefix="bench-udpblast-") as build:
        exe = build_blaster(Path(build))
        for round_ in range(args.rounds):
            for name in servers if round_ % 2 == 0 else servers[::-1]:
                with serving(name, server_cpu, baseline_src=args.baseline_src) as (target, _):
                    for label, run in cases:
                        result = run(exe, target)
                        blasts.setdefault((label, name), []).append(result)
                        print(f"  {name}: {label}: {result.rate:,.0f}", file=sys.stderr)
                    if not args.skip_allocations:
                        rate, cpu = allocations(target, args.seconds)
                        allocs.setdefault(name, []).append((rate, cpu))
                        print(f"  {name}: allocations/s: {rate:,.0f}", file=sys.stderr)
            if not args.skip_http:
                http_runs.append(
                    http_under_load(
                        exe, generator_cpu, server_cpu, args.seconds, args.http_turn_workers
                    )
                )
                print(f"  http: {http_runs[-1][:2]}", file=sys.stderr)

    print(f"# TURN on one core, {time.strftime('%Y-%m-%d %H:%M')}, median of {args.rounds}")
    print(f"\nserver on CPU {server_cpu}, load generator on CPU {generator_cpu}\n")
    print(
        "| figure | server | received/s | per server CPU-s | offered/s | generator CPU % ", end=""
    )
    print("| server CPU % | drops server / generator |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, _ in cases:
        for name in servers:
            print(f"| {label} | {name} | {fmt_blast(median_by(blasts[(label, name)]))} |")
    if allocs:
        print(
            "\n| allocations (401 + Allocate + Refresh 0), 64 in flight | server | per s ", end=""
        )
        print("| per server CPU-s | server CPU % |")
        print("|---|---|---:|---:|---:|")
        for name, runs in allocs.items():
            rate, cpu = sorted(runs)[len(runs) // 2]
            per_core = statistics.median(r / min(1.0, c) for r, c in runs if c > 0)
            print(f"| | {name} | {rate:,.0f} | {per_core:,.0f} | {100 * cpu:.0f} |")
    if "coturn" in servers:
        print("\n| figure | p2pserver / coturn, received/s | per server CPU-s |")
        print("|---|---:|---:|")
        for label, _ in cases:
            ours, theirs = blasts[(label, "p2pserver")], blasts[(label, "coturn")]
            ratio = median_by(ours).rate / median_by(theirs).rate
            per_core = median_per_core(ours) / median_per_core(theirs)
            before = ["", ""]
            if args.baseline_src:
                old = blasts[(label, BASELINE)]
                before[0] = f" (before: {median_by(old).rate / median_by(theirs).rate:.2f}x)"
                before[1] = f" (before: {median_per_core(old) / median_per_core(theirs):.2f}x)"
            print(f"| {label} | {ratio:.2f}x{before[0]} | {per_core:.2f}x{before[1]} |")
        if allocs:

            def rates(name: str) -> tuple[float, float]:
                runs = allocs[name]
                rate = sorted(runs)[len(runs) // 2][0]
                return rate, statistics.median(r / min(1.0, c) for r, c in runs if c > 0)

            ours, theirs = rates("p2pserver"), rates("coturn")
            before = ["", ""]
            if args.baseline_src:
                old = rates(BASELINE)
                before = [f" (before: {old[i] / theirs[i]:.2f}x)" for i in (0, 1)]
            print(
                f"| allocations/s | {ours[0] / theirs[0]:.2f}x{before[0]} "
                f"| {ours[1] / theirs[1]:.2f}x{before[1]} |"
            )
    if http_runs:
        idle_p50 = statistics.median(r[0][0] for r in http_runs) * 1000
        idle_p99 = statistics.median(r[0][1] for r in http_runs) * 1000
        load_p50 = statistics.median(r[1][0] for r in http_runs) * 1000
        load_p99 = statistics.median(r[1][1] for r in http_runs) * 1000
        load = median_by([r[2] for r in http_runs])
        shape = (
            "one process: HTTP and TURN"
            if args.http_turn_workers == 1
            else f"HTTP in the main process, {args.http_turn_workers} TURN workers"
        )
        print(f"\n| GET /check-chat ({shape}, one CPU) | p50 ms | p99 ms |")
        print("|---|---:|---:|")
        print(f"| idle | {idle_p50:.2f} | {idle_p99:.2f} |")
        print(f"| relay to relay 160 B at saturation | {load_p50:.2f} | {load_p99:.2f} |")
        print(f"\nthe load meanwhile: {fmt_blast(load)} (received/s | offered/s | gen % | ...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
