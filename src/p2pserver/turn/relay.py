"""Relay sockets: plain non-blocking UDP sockets read through `loop.add_reader`.

They are opened synchronously inside the Allocate handler (no await between the request and
its answer) and read in batches, which is cheaper than a DatagramProtocol per allocation.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Mapping

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


class RelayPorts:
    """Opens relay sockets on a random free port of the range, and keeps EVEN-PORT reservations."""

    def __init__(
        self,
        bind_ips: Mapping[int, str],
        ports: tuple[int, int],
        loop: asyncio.AbstractEventLoop,
        on_fault: Callable[[], None] = lambda: None,
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
                return None
            raise
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
        for port in self._candidates(even_port or reserve_next):
            sock = self._bind(family, port)
            if sock is None:
                continue
            token = None
            if reserve_next:
                partner = self._bind(family, port + 1)
                if partner is None:
                    sock.close()
                    continue
                token = os.urandom(8)
                self.reservations[token] = (partner, self.clock() + RESERVATION_LIFETIME)
            if dont_fragment:
                _set_dont_fragment(sock)
            return RelaySocket(sock, self.loop, self.on_fault), token
        raise NoCapacity("no free relay port")

    def take_reserved(self, token: bytes) -> RelaySocket | None:
        entry = self.reservations.pop(token, None)
        if entry is None:
            return None
        return RelaySocket(entry[0], self.loop, self.on_fault)

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
