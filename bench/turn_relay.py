"""Benchmarks of the TURN relay: the data path in-process, then end-to-end over loopback.

    .venv/bin/python bench/turn_relay.py                  # both parts (what `make bench` runs)
    .venv/bin/python bench/turn_relay.py --skip-micro --rates 2000,10000,20000 --seconds 5
    .venv/bin/python bench/turn_relay.py --compare-coturn # the same load against coturn too

Part 1 times the data-path functions with time.perf_counter_ns (median ns per call over batches
of 1000 calls). Part 2 starts `p2pserver --no-http` as a subprocess, allocates a relay, binds a
channel to a UDP echo peer and sends ChannelData at fixed rates; each datagram carries its
sequence number and send time, so the echo that comes back through the relay gives delivery,
loss and round-trip time. Everything stays on 127.0.0.1. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aioice import stun as aiostun
from aioice.stun import Class, Method

from p2pserver.config import Settings
from p2pserver.turn import stun as p2pstun
from p2pserver.turn.allocation import Allocation, AllocationTable
from p2pserver.turn.datapath import channel_data, data_indication, parse_send
from p2pserver.turn.handlers import Client, TurnCore
from p2pserver.turn.policy import PeerPolicy
from p2pserver.turn.stun import TurnMessage as Message
from p2pserver.turn.stun import parse_message

ROOT = Path(__file__).resolve().parent.parent
LOCALHOST = "127.0.0.1"
CHANNEL = 0x4000
USER = PASSWORD = "bench"
STAMP = struct.Struct("!IQ")  # sequence number, send time (perf_counter_ns) at the payload's head
SIZES = (100, 1200)

# --- part 1: micro-benchmarks ------------------------------------------------------------------


def time_per_call(fn: Callable[[], object], count: int, seconds: float) -> float:
    """ns per call of `fn` in the fastest batch of 1000 calls (the least disturbed by other
    processes, as timeit advises); at most `count` calls and about `seconds` of wall time."""
    batch = 1000
    per_call: list[float] = []
    deadline = time.perf_counter_ns() + int(seconds * 1e9)
    done = 0
    while done < count and (len(per_call) < 3 or time.perf_counter_ns() < deadline):
        start = time.perf_counter_ns()
        for _ in range(batch):
            fn()
        per_call.append((time.perf_counter_ns() - start) / batch)
        done += batch
    return min(per_call)


class CountingRelay:
    """A relay socket stand-in: counts what the allocation would send to peers."""

    family = 1
    address = (LOCALHOST, 50000)
    dropped = 0

    def __init__(self) -> None:
        self.sent = 0

    def start(self, on_datagram: Callable[[bytes, tuple[str, int]], None]) -> None:
        pass

    def sendto(self, data: bytes, peer: tuple[str, int]) -> None:
        self.sent += 1

    def close(self) -> None:
        pass


def send_indication(peer: tuple[str, int], payload: bytes) -> bytes:
    message = Message(Method.SEND, Class.INDICATION)
    message.attributes["XOR-PEER-ADDRESS"] = peer
    message.attributes["DATA"] = payload
    return bytes(message)


def micro_cases(size: int) -> Iterator[tuple[str, Callable[[], object]]]:
    """(name, call) for each measured operation, with a payload of `size` bytes."""
    payload = os.urandom(size)
    odd = payload[:-1] if size % 4 == 0 else payload
    peer = ("198.51.100.7", 40000)  # a documentation address: only ever a value here
    other = ("198.51.100.8", 40001)
    send = send_indication(peer, payload)
    frame = struct.pack("!HH", CHANNEL, size) + payload
    relay = CountingRelay()
    delivered: list[int] = [0]
    policy = PeerPolicy(allow=(ipaddress.ip_network("198.51.100.0/24"),))  # no socket is used
    allocation = Allocation(
        five_tuple=("udp", (LOCALHOST, 40000), (LOCALHOST, 3478)),
        username=USER,
        key=b"k" * 16,
        relays={1: relay},
        relayed_addresses={1: relay.address},
        expires=time.time() + 600,
        send_to_client=lambda data: delivered.__setitem__(0, delivered[0] + 1),
        permits=policy.permits,
    )
    now = time.time()
    assert allocation.bind_channel(CHANNEL, peer, now) is None
    allocation.permit(other[0], now)
    message = aiostun.parse_message(send)  # aioice's own, as the rows below measure

    yield "(empty call, for reference)", lambda: None
    yield "datapath.channel_data (UDP)", lambda: channel_data(CHANNEL, payload, False)
    yield "datapath.channel_data (TCP, padded)", lambda: channel_data(CHANNEL, odd, True)
    yield "datapath.data_indication", lambda: data_indication(peer, payload)
    yield "datapath.parse_send", lambda: parse_send(send)
    yield "Allocation.from_client_channel", lambda: allocation.from_client_channel(frame)
    yield "Allocation.from_peer (channel)", lambda: allocation.from_peer(payload, peer)
    yield "Allocation.from_peer (Data indication)", lambda: allocation.from_peer(payload, other)
    sender, receiver = relay_pair()
    yield "from_client_channel, relay to relay inside", lambda: sender.from_client_channel(frame)
    yield "aioice parse_message(Send indication)", lambda: aiostun.parse_message(send)
    yield "aioice bytes(Message) (Send indication)", lambda: bytes(message)
    yield "p2pserver stun.decode(Send indication)", lambda: p2pstun.decode(send)
    if size == SIZES[0]:
        core = TurnCore(Settings(http=False), _NoRelays(), policy)
        client = Client("udp", (LOCALHOST, 40000), (LOCALHOST, 3478), lambda data: None)
        binding = bytes(Message(Method.BINDING, Class.REQUEST))
        yield "TurnCore.handle(Binding request)", lambda: core.handle(binding, client, now)
        # The UDP listener's fast path, and the per-request count it pays for /metrics.
        remote = client.remote
        yield (
            "TurnCore.answer_binding (UDP fast path)",
            lambda: core.answer_binding(binding, remote),
        )
        count, method = core.stats.count_request, Method.BINDING
        yield "TurnStats.count_request (metrics)", lambda: count(method, "udp")
    assert relay.sent and delivered[0] and receiver.peer_rcvp  # each path really ran


def relay_pair() -> tuple[Allocation, Allocation]:
    """Two allocations of one process with a channel 0x4000 to each other's relayed address:
    the relay-to-relay hand-over (docs/turn.md), the clients' sends no-ops."""
    policy = PeerPolicy(allow=(ipaddress.ip_network("127.0.0.0/8"),))
    table = AllocationTable(user_quota=0, max_allocations=10)
    pair = []
    for port in (50000, 50001):
        relay = CountingRelay()
        relay.address = (LOCALHOST, port)  # type: ignore[misc]
        allocation = Allocation(
            five_tuple=("udp", (LOCALHOST, port - 10000), (LOCALHOST, 3478)),
            username=USER,
            key=b"k" * 16,
            relays={1: relay},
            relayed_addresses={1: relay.address},
            expires=time.time() + 600,
            send_to_client=lambda data: None,
            permits=policy.permits,
        )
        table.add(allocation)
        pair.append(allocation)
    sender, receiver = pair
    now = time.time()
    assert sender.bind_channel(CHANNEL, receiver.relayed_address, now) is None
    assert receiver.bind_channel(CHANNEL, sender.relayed_address, now) is None
    return sender, receiver


class _NoRelays:
    families = frozenset({1})

    def open(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the Binding benchmark opens no relay")

    def take_reserved(self, token: bytes) -> None:
        return None

    def next_deadline(self) -> float | None:
        return None

    def expire(self, now: float) -> None:
        pass


def run_micro(count: int, seconds: float) -> str:
    rows: dict[str, dict[int, float]] = {}
    for size in SIZES:
        for name, fn in micro_cases(size):
            rows.setdefault(name, {})[size] = time_per_call(fn, count, seconds)
    lines = [
        "| operation | ns/op, 100 B | ns/op, 1200 B |",
        "|---|---:|---:|",
    ]
    for name, by_size in rows.items():
        cells = [f"{by_size[s]:,.0f}" if s in by_size else "" for s in SIZES]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


# --- part 2: end-to-end over loopback ----------------------------------------------------------


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (the TURN servers listen on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((LOCALHOST, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((LOCALHOST, port))
                except OSError:
                    continue
                return int(port)
    raise RuntimeError("no free port")


def big_buffers(sock: socket.socket) -> socket.socket:
    """Large socket buffers, so that the load generator drops as little as it can."""
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
    return sock


class TurnClient:
    """A blocking TURN client over UDP: long-term credentials, Allocate, ChannelBind,
    CreatePermission."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.sock = big_buffers(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        self.sock.connect(server)
        self.sock.settimeout(1.0)
        self.key: bytes | None = None
        self.realm = ""
        self.nonce = b""

    def transact(self, message: Message, attempts: int = 5) -> Message:
        if self.key is not None:
            message.attributes["USERNAME"] = USER
            message.attributes["REALM"] = self.realm
            message.attributes["NONCE"] = self.nonce
            message.add_message_integrity(self.key)
        data = bytes(message)
        for _ in range(attempts):
            self.sock.send(data)
            deadline = time.monotonic() + 1.0
            with contextlib.suppress(TimeoutError):
                while (left := deadline - time.monotonic()) > 0:
                    self.sock.settimeout(left)
                    raw = self.sock.recv(65536)  # skips relayed data still in flight
                    if raw[0] < 0x40 and raw[8:20] == message.transaction_id:
                        return parse_message(raw)
        raise TimeoutError(f"no answer to {message.message_method.name}")

    def allocate(self) -> tuple[str, int]:
        request = {"REQUESTED-TRANSPORT": 0x11000000}
        challenge = self.transact(Message(Method.ALLOCATE, Class.REQUEST, None, dict(request)))
        if challenge.error_code != 401:
            raise RuntimeError(f"expected a 401 challenge, got {challenge}")
        self.realm = challenge.attributes["REALM"]
        self.nonce = challenge.attributes["NONCE"]
        self.key = hashlib.md5(f"{USER}:{self.realm}:{PASSWORD}".encode()).digest()
        answer = self.transact(Message(Method.ALLOCATE, Class.REQUEST, None, dict(request)))
        if answer.message_class != Class.RESPONSE:
            raise RuntimeError(f"Allocate failed: {answer}")
        return tuple(answer.attributes["XOR-RELAYED-ADDRESS"])  # type: ignore[return-value]

    def channel_bind(self, peer: tuple[str, int], number: int = CHANNEL) -> None:
        attrs = {"CHANNEL-NUMBER": number, "XOR-PEER-ADDRESS": peer}
        answer = self.transact(Message(Method.CHANNEL_BIND, Class.REQUEST, None, attrs))
        if answer.message_class != Class.RESPONSE:
            raise RuntimeError(f"ChannelBind failed: {answer}")

    def create_permission(self, peer: tuple[str, int]) -> None:
        attrs = {"XOR-PEER-ADDRESS": peer}
        answer = self.transact(Message(Method.CREATE_PERMISSION, Class.REQUEST, None, attrs))
        if answer.message_class != Class.RESPONSE:
            raise RuntimeError(f"CreatePermission failed: {answer}")

    def refresh_delete(self) -> None:
        with contextlib.suppress(TimeoutError):
            self.transact(Message(Method.REFRESH, Class.REQUEST, None, {"LIFETIME": 0}), 2)

    def close(self) -> None:
        self.sock.close()


@dataclass
class LoadResult:
    server: str
    size: int
    offered: int  # packets/s asked for
    seconds: float
    sent: int
    at_peer: int  # datagrams the peer got through the relay (one way)
    returned: int  # echoes back at the client (round trip through the relay, both ways)
    rtts_ns: list[int]
    server_cpu: float | None  # fraction of one core the server process used, if known
    server_drops: int  # datagrams the kernel dropped at the server's full sockets
    generator_drops: int  # ... at this generator's own sockets, and echoes it could not send

    def row(self) -> str:
        rtts = sorted(self.rtts_ns)
        p50 = rtts[len(rtts) // 2] / 1000 if rtts else float("nan")
        p99 = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] / 1000 if rtts else float("nan")
        loss = 100.0 * (1 - self.returned / self.sent) if self.sent else float("nan")
        cpu = f"{100 * self.server_cpu:.0f}" if self.server_cpu is not None else "-"
        return (
            f"| {self.server} | {self.size} | {self.offered:,} | {self.sent / self.seconds:,.0f} "
            f"| {self.at_peer / self.seconds:,.0f} | {self.returned / self.seconds:,.0f} "
            f"| {loss:.2f} | {p50:,.0f} | {p99:,.0f} | {cpu} "
            f"| {self.server_drops:,} / {self.generator_drops:,} |"
        )


TABLE_HEAD = (
    "| server | payload B | offered pkt/s | sent pkt/s | at peer pkt/s | echoed back pkt/s "
    "| loss % | RTT p50 µs | RTT p99 µs | server CPU % | drops server / generator |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def udp_drops(ports: set[int]) -> int:
    """Datagrams the kernel dropped for a full receive buffer, summed over the UDP sockets bound
    to these ports (Linux /proc/net/udp: the last column)."""
    total = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) in ports:
                total += int(fields[-1])
    return total


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process and all its threads (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def offer_load(
    client: socket.socket,
    peer: socket.socket,
    header: bytes,
    size: int,
    rate: int,
    seconds: float,
    count: int,
) -> tuple[int, int, int, int, list[int], float]:
    """Send `rate` packets/s for `seconds` (at most `count`), echoing at the peer and timing the
    echoes at the client. Returns (sent, at peer, echoes not sent, returned, RTTs in ns,
    sending time in s)."""
    selector = selectors.DefaultSelector()
    selector.register(client, selectors.EVENT_READ, "client")
    selector.register(peer, selectors.EVENT_READ, "peer")
    padding = bytes(size - STAMP.size)
    total = min(count, max(1, int(rate * seconds)))
    sent = at_peer = unechoed = returned = 0
    rtts: list[int] = []
    seen = bytearray(total)
    start = time.perf_counter_ns()
    stop_sending = start + int(seconds * 1e9)
    drain_until: int | None = None
    sending_time = seconds
    while True:
        now = time.perf_counter_ns()
        if drain_until is None:
            due = min(total, (now - start) * rate // 1_000_000_000 + 1)
            while sent < due:
                try:
                    client.send(header + STAMP.pack(sent, time.perf_counter_ns()) + padding)
                except BlockingIOError:
                    break  # the generator's own buffer is full: try again next tick
                sent += 1
            if sent >= total or now >= stop_sending:
                sending_time = max((now - start) / 1e9, sent / rate)  # sent on time: exact
                drain_until = now + 500_000_000  # half a second for the last echoes
            timeout = 0.0005
        else:
            if now >= drain_until or returned >= sent:
                break
            timeout = 0.01
        for key, _ in selector.select(timeout):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            while True:
                try:
                    data, addr = sock.recvfrom(65536)
                except BlockingIOError:
                    break
                if key.data == "peer":
                    at_peer += 1
                    try:
                        peer.sendto(data, addr)  # echo to the relayed address it came from
                    except BlockingIOError:
                        unechoed += 1
                elif len(data) >= 4 + STAMP.size and data[0] == 0x40:
                    seq, sent_at = STAMP.unpack_from(data, 4)
                    if seq < total and not seen[seq]:
                        seen[seq] = 1
                        returned += 1
                        rtts.append(time.perf_counter_ns() - sent_at)
    selector.close()
    return sent, at_peer, unechoed, returned, rtts, max(sending_time, 1e-9)


def measure(
    server: str,
    address: tuple[str, int] | None,
    pid: int | None,
    args: argparse.Namespace,
) -> list[LoadResult]:
    """Load runs against one TURN server (address None: the peer echoes straight back). Of
    `--repeat` runs per size and rate, the one with the median delivery is kept."""
    results = []
    for size in args.size_list:
        for rate in args.rate_list:
            runs = [one_run(server, address, pid, size, rate, args) for _ in range(args.repeat)]
            runs.sort(key=lambda r: r.returned)
            results.append(runs[len(runs) // 2])
    return results


def one_run(
    server: str,
    address: tuple[str, int] | None,
    pid: int | None,
    size: int,
    rate: int,
    args: argparse.Namespace,
) -> LoadResult:
    peer = big_buffers(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    peer.bind((LOCALHOST, 0))
    turn: TurnClient | None = None
    server_ports: set[int] = set()
    if address is not None:
        turn = TurnClient(address)
        server_ports = {address[1], turn.allocate()[1]}  # the listener and the relay socket
        turn.channel_bind(peer.getsockname())
        sock = turn.sock
    else:  # the same ChannelData bytes, straight to the peer and back
        sock = big_buffers(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sock.connect(peer.getsockname())
    header = struct.pack("!HH", CHANNEL, size)
    sock.setblocking(False)
    peer.setblocking(False)
    try:
        offer_load(sock, peer, header, size, min(rate, 2000), 0.3, args.count)  # warm-up
        own_ports = {sock.getsockname()[1], peer.getsockname()[1]}
        drops_before = udp_drops(server_ports), udp_drops(own_ports)
        cpu_before, wall_before = cpu_seconds(pid) if pid else None, time.monotonic()
        sent, at_peer, unechoed, returned, rtts, elapsed = offer_load(
            sock, peer, header, size, rate, args.seconds, args.count
        )
        cpu_after, wall = cpu_seconds(pid) if pid else None, time.monotonic() - wall_before
        cpu = None
        if cpu_before is not None and cpu_after is not None:
            cpu = (cpu_after - cpu_before) / wall
        result = LoadResult(
            server,
            size,
            rate,
            elapsed,
            sent,
            at_peer,
            returned,
            rtts,
            cpu,
            server_drops=udp_drops(server_ports) - drops_before[0],
            generator_drops=udp_drops(own_ports) - drops_before[1] + unechoed,
        )
        print(result.row(), file=sys.stderr, flush=True)  # progress
        return result
    finally:
        if turn is not None:
            sock.settimeout(1.0)
            turn.refresh_delete()
            turn.close()
        else:
            sock.close()
        peer.close()


@contextlib.contextmanager
def running(
    command: list[str], port: int, name: str, cpus: set[int] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a TURN server until the block ends; it must answer Binding within 10 s. Only this
    process is ever signalled, by its PID. With `cpus`, it and all its threads run there."""

    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=pin
        )
        try:
            wait_for_binding((LOCALHOST, port), process, log, name)
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)


def wait_for_binding(
    address: tuple[str, int], process: subprocess.Popen[bytes], log: Any, name: str
) -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.settimeout(0.1)
    request = bytes(Message(Method.BINDING, Class.REQUEST))
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            with contextlib.suppress(OSError):
                probe.sendto(request, address)
                if probe.recv(2048)[8:20] == request[8:20]:
                    return
            time.sleep(0.05)
    finally:
        probe.close()
    log.seek(0)
    raise RuntimeError(f"{name} did not start:\n{log.read().decode(errors='replace')[-2000:]}")


def p2pserver_command(port: int) -> list[str]:
    exe = Path(sys.executable).with_name("p2pserver")
    return [
        str(exe) if exe.exists() else "p2pserver",
        "--no-http",
        "--turn-host",
        LOCALHOST,
        "--turn-port",
        str(port),
        "--user",
        f"{USER}:{PASSWORD}",
        "--allow-peer",
        "127.0.0.0/8",
        "--log-level",
        "warning",
    ]


def coturn_command(port: int, turnserver: str) -> list[str]:
    return [
        turnserver,
        "-n",  # no configuration file: only these flags
        "--listening-ip",
        LOCALHOST,
        "--listening-port",
        str(port),
        "--relay-ip",
        LOCALHOST,
        "--user",
        f"{USER}:{PASSWORD}",
        "--realm",
        "bench",
        "--lt-cred-mech",
        "--allow-loopback-peers",  # coturn 4.6 refuses 127.0.0.0/8 peers without it
        "--allowed-peer-ip=127.0.0.1",
        "--no-cli",
        "--no-tls",
        "--no-dtls",
        "--no-stdout-log",
        "--log-file",
        "/dev/null",
        "--pidfile",
        str(Path(tempfile.gettempdir()) / f"bench-turnserver-{port}.pid"),
    ]


def run_e2e(args: argparse.Namespace) -> str:
    results: list[LoadResult] = []
    print(TABLE_HEAD, file=sys.stderr, flush=True)
    server_cpus: set[int] | None = None
    if args.pin:  # the generator on the first CPU it may use, servers on the others
        mine = sorted(os.sched_getaffinity(0))
        if len(mine) < 2:
            raise SystemExit("--pin needs 2 CPUs")
        os.sched_setaffinity(0, {mine[0]})
        server_cpus = set(mine[1:])
    if args.baseline:
        results += measure("none (direct echo)", None, None, args)
    port = free_port()
    with running(p2pserver_command(port), port, "p2pserver", server_cpus) as process:
        results += measure("p2pserver", (LOCALHOST, port), process.pid, args)
    if args.compare_coturn:
        turnserver = shutil.which("turnserver")
        if turnserver is None:
            print("--compare-coturn: no turnserver on PATH (apt-get install coturn)")
        else:
            port = free_port()
            with running(coturn_command(port, turnserver), port, "coturn", server_cpus) as process:
                results += measure("coturn", (LOCALHOST, port), process.pid, args)
    return "\n".join([TABLE_HEAD, *(r.row() for r in results)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each load run (3)")
    parser.add_argument(
        "--count", type=int, default=100_000, help="most packets in one load run (100000)"
    )
    parser.add_argument(
        "--rates", default="2000,10000,20000", help="offered packets/s (2000,10000,20000)"
    )
    parser.add_argument(
        "--micro-seconds", type=float, default=0.3, help="time per micro-benchmark (0.3)"
    )
    parser.add_argument(
        "--micro-count", type=int, default=300_000, help="most calls per micro-benchmark"
    )
    parser.add_argument("--sizes", default="100,1200", help="ChannelData payload bytes (100,1200)")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per size and rate; the median is kept (1)"
    )
    parser.add_argument(
        "--pin", action="store_true", help="load generator on one CPU, the server on the others"
    )
    parser.add_argument("--skip-micro", action="store_true", help="only the end-to-end part")
    parser.add_argument("--skip-e2e", action="store_true", help="only the micro-benchmarks")
    parser.add_argument(
        "--baseline", action="store_true", help="also time the echo without any TURN server"
    )
    parser.add_argument(
        "--compare-coturn", action="store_true", help="run the same load against coturn"
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.count <= 0 or args.repeat <= 0:
        parser.error("--seconds, --count and --repeat must be positive")
    try:
        args.rate_list = [int(r) for r in args.rates.split(",") if r.strip()]
        args.size_list = [int(r) for r in args.sizes.split(",") if r.strip()]
    except ValueError:
        parser.error("--rates and --sizes take comma-separated numbers")
    if not all(STAMP.size <= size <= 65000 for size in args.size_list):
        parser.error(f"--sizes must be between {STAMP.size} and 65000")
    print(f"# TURN relay benchmark, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs")
    if not args.skip_micro:
        print("\n## Data path, in-process (ns per call, fastest batch)\n", flush=True)
        print(run_micro(args.micro_count, args.micro_seconds), flush=True)
    if not args.skip_e2e:
        print("\n## End to end over loopback: ChannelData -> relay -> echo peer -> back\n")
        print(run_e2e(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
