"""Relay sockets: plain non-blocking UDP sockets read through `loop.add_reader`.

They are opened synchronously inside the Allocate handler (no await between the request and
its answer) and read in batches, which is cheaper than a DatagramProtocol per allocation.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import hmac
import logging
import os
import random
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from p2pserver.turn.allocation import Address, NoCapacity

log = logging.getLogger(__name__)

RESERVATION_LIFETIME = 30.0  # RFC 8656 §7.2 (EVEN-PORT R bit): "about 30 seconds"
_READ_BATCH = 64  # datagrams read per wake-up, so one busy relay cannot starve the rest
_BIND_TRIES = 40
_BUFFER = 65535
_RCVBUF = 1 << 20


class RelaySocket:
    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        on_fault: Callable[[], None] = lambda: None,
    ) -> None:
        self.sock = sock
        self.loop = loop
        self.on_fault = on_fault
        self.family = 2 if sock.family == socket.AF_INET6 else 1
        self.address: Address = sock.getsockname()[:2]
        self.dropped = 0
        self._reading = False

    def start(self, on_datagram: Callable[[bytes, Address], None]) -> None:
        sock = self.sock
        ipv6 = self.family == 2
        on_fault = self.on_fault

        def readable() -> None:
            for _ in range(_READ_BATCH):
                try:
                    data, addr = sock.recvfrom(_BUFFER)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    continue  # ICMP errors surface here; the next datagram may be fine
                try:
                    on_datagram(data, addr[:2] if ipv6 else addr)  # drop IPv6 flowinfo, scope
                except Exception:
                    on_fault()  # a bug costs this datagram; the reader keeps going

        self.loop.add_reader(sock.fileno(), readable)
        self._reading = True

    def sendto(self, data: bytes, peer: Address) -> None:
        try:
            self.sock.sendto(data, peer)
        except OSError:
            self.dropped += 1  # UDP: a full buffer or an ICMP error loses this datagram only

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        if self._reading:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


@dataclass(frozen=True)
class Hairpin:
    """Relay to relay through --external-ip without leaving the host (docs/turn.md, "Relay to
    relay through --external-ip").

    A peer address `external`:port with a port of the whole relay range (any worker's) is one of
    this server's own relays: send to where that relay really is (`real`: the relay bind address,
    loopback when that is a wildcard) instead, as a NAT that does not hairpin would never deliver
    it. The receiving relay sees the datagram come from `real`:port and takes it as coming from
    `external`:port, so permissions and channels match what its client installed."""

    family: int  # 1 = IPv4, 2 = IPv6: the family of --external-ip
    external: str
    real: str
    ports: tuple[int, int]  # the whole relay range, not a worker's slice


class HairpinRelaySocket(RelaySocket):
    """A relay socket of the family of --external-ip: translates as `Hairpin` says."""

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        on_fault: Callable[[], None],
        hairpin: Hairpin,
    ) -> None:
        super().__init__(sock, loop, on_fault)
        self.hairpin = hairpin

    def start(self, on_datagram: Callable[[bytes, Address], None]) -> None:
        external, real = self.hairpin.external, self.hairpin.real
        low, high = self.hairpin.ports

        def translated(data: bytes, addr: Address) -> None:
            if addr[0] == real and low <= addr[1] <= high:
                addr = (external, addr[1])
            on_datagram(data, addr)

        super().start(translated)

    def sendto(self, data: bytes, peer: Address) -> None:
        hairpin = self.hairpin
        if peer[0] == hairpin.external and hairpin.ports[0] <= peer[1] <= hairpin.ports[1]:
            peer = (hairpin.real, peer[1])
        super().sendto(data, peer)


class RelayPorts:
    """Opens relay sockets on a random free port of the range, and keeps EVEN-PORT reservations."""

    def __init__(
        self,
        bind_ips: Mapping[int, str],
        ports: tuple[int, int],
        loop: asyncio.AbstractEventLoop,
        on_fault: Callable[[], None] = lambda: None,
        hairpin: Hairpin | None = None,
    ) -> None:
        self.bind_ips = dict(bind_ips)  # by family: 1 = IPv4, 2 = IPv6 (--relay-ip)
        self.ports = ports
        self.loop = loop
        self.on_fault = on_fault  # called from an `except` block when relaying fails
        self.families = frozenset(self.bind_ips)
        # Token -> (socket, expiry on the monotonic clock), in the order they expire: all live
        # RESERVATION_LIFETIME, so the first one is always the next to go.
        self.reservations: dict[bytes, tuple[socket.socket, float]] = {}
        self.clock = time.monotonic  # the clock of TurnCore's `now`
        self.hairpin = hairpin

    def _relay(self, sock: socket.socket) -> RelaySocket:
        hairpin = self.hairpin
        family = 2 if sock.family == socket.AF_INET6 else 1
        if hairpin is not None and hairpin.family == family:
            return HairpinRelaySocket(sock, self.loop, self.on_fault, hairpin)
        return RelaySocket(sock, self.loop, self.on_fault)

    def _bind(self, family: int, port: int) -> socket.socket | None:
        af = socket.AF_INET6 if family == 2 else socket.AF_INET
        sock = socket.socket(af, socket.SOCK_DGRAM)
        try:
            if af == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((self.bind_ips[family], port))
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return None  # this port only: try another
            # No port will do (say, a --relay-ip this host does not have): the Allocate gets
            # 508, or ADDRESS-ERROR-CODE for an additional family (RFC 8656 §7.2).
            raise NoCapacity(f"cannot bind a relay on {self.bind_ips[family]}: {exc}") from exc
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        return sock

    def _candidates(self, even: bool) -> list[int]:
        low, high = self.ports
        picks = []
        for _ in range(_BIND_TRIES):
            port = random.randint(low, high)
            if even:
                port &= ~1
                if port < low or port + 1 > high:
                    continue
            picks.append(port)
        return picks

    def open(
        self, family: int, *, even_port: bool, reserve_next: bool, dont_fragment: bool
    ) -> tuple[RelaySocket, bytes | None]:
        now = self.clock()
        for port in self._candidates(even_port or reserve_next):
            if not self._usable(port, reserve_next, now):
                continue
            sock = self._bind(family, port)
            if sock is None:
                continue
            token = None
            if reserve_next:
                token = self._reserve(family, port + 1, now)
                if token is None:
                    sock.close()
                    continue
            if dont_fragment:
                _set_dont_fragment(sock)
            return self._relay(sock), token
        raise NoCapacity("no free relay port")

    def _usable(self, port: int, reserve_next: bool, now: float) -> bool:
        """Whether `port` may be tried (with `reserve_next`, and port + 1 kept for later)."""
        return True

    def _reserve(self, family: int, port: int, now: float) -> bytes | None:
        """Keep `port` for a later Allocate (EVEN-PORT R bit); its token, or None if taken."""
        partner = self._bind(family, port)
        if partner is None:
            return None
        token = os.urandom(8)
        self.reservations[token] = (partner, now + RESERVATION_LIFETIME)
        return token

    def take_reserved(self, token: bytes) -> RelaySocket | None:
        entry = self.reservations.pop(token, None)
        if entry is None:
            return None
        return self._relay(entry[0])

    def next_deadline(self) -> float | None:
        for _, expires in self.reservations.values():  # the first expires first
            return expires
        return None

    def expire(self, now: float) -> None:
        """Close reservations not taken in time (`now` is monotonic, as in TurnCore), from the
        front: the work is what expires."""
        due = []
        for token, (_, expires) in self.reservations.items():
            if expires > now:
                break
            due.append(token)
        for token in due:
            self.reservations.pop(token)[0].close()

    def close(self) -> None:
        for sock, _ in self.reservations.values():
            sock.close()
        self.reservations.clear()


def _set_dont_fragment(sock: socket.socket) -> None:
    """DONT-FRAGMENT (RFC 8656 §14.8): set DF on what this relay sends, where the OS lets us."""
    value: int | None = getattr(socket, "IP_PMTUDISC_DO", None)
    if value is None:
        return
    if sock.family == socket.AF_INET:
        level, option = socket.IPPROTO_IP, getattr(socket, "IP_MTU_DISCOVER", 10)
    else:
        level, option = socket.IPPROTO_IPV6, getattr(socket, "IPV6_MTU_DISCOVER", 23)
    try:
        sock.setsockopt(level, option, value)
    except OSError:
        log.debug("could not set DF on a relay socket")


class SharedRelayPorts(RelayPorts):
    """RelayPorts for one of several TURN workers: EVEN-PORT reservations any worker can take.

    A client's Allocate with a RESERVATION-TOKEN comes from a new 5-tuple, which the kernel may
    steer to another worker than the one that reserved the port (docs/turn.md, "Workers"). So
    the token carries the port itself, signed with a key all workers share: port (2 bytes),
    family bit and issue time in seconds mod 2^15 (2 bytes), HMAC (4 bytes). The reserving
    worker does not hold the port bound (another process could not take it over); it only stops
    picking it from its own slice until the reservation ends, and no other worker picks from
    that slice. Whichever worker gets the token binds the port and will not take it again; a
    second use elsewhere finds the port taken (508) while the first allocation holds it.
    """

    def __init__(
        self,
        bind_ips: Mapping[int, str],
        ports: tuple[int, int],
        loop: asyncio.AbstractEventLoop,
        on_fault: Callable[[], None] = lambda: None,
        hairpin: Hairpin | None = None,
        *,
        token_key: bytes,
        whole_range: tuple[int, int],
    ) -> None:
        super().__init__(bind_ips, ports, loop, on_fault, hairpin)
        self.token_key = token_key
        self.whole_range = whole_range  # a token may name a port of any worker's slice
        self.held: dict[int, float] = {}  # reserved ports of this slice -> end of reservation
        self.taken: dict[bytes, float] = {}  # tokens used here -> when they would have expired

    def _mac(self, head: bytes, issued: int) -> bytes:
        # The MAC covers the whole issue time, not just the 15 bits the token carries, so a
        # token replayed a multiple of 2^15 s (9.1 h) later does not pass for a fresh one.
        message = head + issued.to_bytes(8, "big")
        return hmac.new(self.token_key, message, hashlib.sha256).digest()[:4]

    def _token(self, family: int, port: int, now: float) -> bytes:
        issued = int(now)
        stamp = (issued & 0x7FFF) | (0x8000 if family == 2 else 0)
        head = struct.pack("!HH", port, stamp)
        return head + self._mac(head, issued)

    def _usable(self, port: int, reserve_next: bool, now: float) -> bool:
        return self.held.get(port, 0.0) <= now and not (reserve_next and port + 1 in self.held)

    def _reserve(self, family: int, port: int, now: float) -> bytes | None:
        probe = self._bind(family, port)  # free now; then kept free by `held`
        if probe is None:
            return None
        probe.close()
        self.held[port] = now + RESERVATION_LIFETIME  # on TurnCore's clock
        return self._token(family, port, time.time())  # the token's stamp is wall time

    def take_reserved(self, token: bytes) -> RelaySocket | None:
        if len(token) != 8:
            return None
        port, stamp = struct.unpack("!HH", token[:4])
        family = 2 if stamp & 0x8000 else 1
        now = int(time.time())
        age = (now - stamp) & 0x7FFF
        if not hmac.compare_digest(token[4:], self._mac(token[:4], now - age)):
            return None
        low, high = self.whole_range
        if age > RESERVATION_LIFETIME or not low <= port <= high or family not in self.bind_ips:
            return None
        if token in self.taken:  # good once, also once its first relay has closed again
            return None
        self.held.pop(port, None)
        sock = self._bind(family, port)
        if sock is None:
            return None
        self.taken[token] = self.clock() + RESERVATION_LIFETIME
        return self._relay(sock)

    def next_deadline(self) -> float | None:
        # A handful at most: one per EVEN-PORT reservation, held or taken.
        return min((*self.held.values(), *self.taken.values()), default=None)

    def expire(self, now: float) -> None:
        for port in [p for p, end in self.held.items() if end <= now]:
            del self.held[port]
        for token in [t for t, end in self.taken.items() if end <= now]:
            del self.taken[token]
