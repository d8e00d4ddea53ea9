"""The asyncio layer: UDP, TCP and TLS listeners around TurnCore, and its timers.

ChannelData from clients never reaches TurnCore: the listeners hand it to the allocation of its
5-tuple straight away (allocation.py, `from_client_channel`). Expiry runs when the core says
(`TurnCore.next_deadline`, scheduled with `loop.call_later`), never as a sweep over everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from p2pserver.config import Settings, StartupError
from p2pserver.selftest import SelfTest
from p2pserver.turn.allocation import Address, Allocation, FiveTuple, UserCounts, family_of
from p2pserver.turn.auth import Nonces
from p2pserver.turn.datapath import CHANNEL_FIRST_BYTES
from p2pserver.turn.framing import FramingError, StreamFramer
from p2pserver.turn.handlers import Client, TurnCore
from p2pserver.turn.policy import PeerPolicy
from p2pserver.turn.relay import Hairpin, RelayPorts, SharedRelayPorts
from p2pserver.turn.stun import BINDING_REQUEST, SEND_INDICATION

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 1.0  # how often log counts held back by RateLimitedLog are looked at
TIMER_FAULT_BACKOFF = 1.0  # after a fault in the timers, wait this long before trying again
TCP_IDLE_TIMEOUT = 60.0  # a TCP/TLS connection that allocates nothing is closed after this
TCP_MAX_BUFFERED = 1 << 20  # relay data for a client that does not read is dropped past this


class RateLimitedLog:
    """At most one line per `interval` for a kind of trouble, with how often it happened.

    Faults (bugs: an exception in a callback) are logged at ERROR, the first of each kind with
    its traceback, so an operator has something to report; after that only counts. Counts not
    yet logged are written by `flush()` (called every FLUSH_INTERVAL, and by stop()), so the
    counts in the log add up to the fault counter."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}
        self._error: dict[str, bool] = {}
        self._message: dict[str, str] = {}
        self._traced: set[str] = set()

    def __call__(self, kind: str, message: str, *, error: bool = False) -> None:
        self._count[kind] = self._count.get(kind, 0) + 1
        self._message[kind] = message
        self._error[kind] = error
        now = time.monotonic()
        if now - self._last.get(kind, -self.interval) >= self.interval:
            self._emit(kind, now)

    def fault(self, kind: str, message: str) -> None:
        """Call from an `except` block: the traceback is the one being handled."""
        if kind in self._traced:
            self(kind, message, error=True)
            return
        self._traced.add(kind)
        self._count[kind] = self._count.get(kind, 0) + 1
        self._message[kind], self._error[kind] = message, True
        self._emit(kind, time.monotonic(), exc_info=True)

    def _emit(self, kind: str, now: float, exc_info: bool = False) -> None:
        self._last[kind] = now
        count, self._count[kind] = self._count[kind], 0
        (self.logger.error if self._error[kind] else self.logger.warning)(
            "%s (%d in the last %.0f s)",
            self._message[kind],
            count,
            self.interval,
            exc_info=exc_info,
        )

    def flush(self, now: float | None = None) -> None:
        """Log the counts held back; with `now`, only of kinds whose interval has passed."""
        for kind, count in list(self._count.items()):
            if count and (now is None or now - self._last.get(kind, 0.0) >= self.interval):
                self._emit(kind, time.monotonic() if now is None else now)


class UdpListener(asyncio.DatagramProtocol):
    """The UDP listener. The event loop's transport receives; what goes out is sent with the
    socket's own sendto, on a duplicate of its descriptor: that costs less than the transport's
    sendto (bench/README.md, "Relay to relay, taken further"), and a datagram the OS cannot take
    is dropped and counted (`client_write_drops`), as UDP may, not queued."""

    def __init__(self, server: TurnServer) -> None:
        self.server = server
        self.allocation: Callable[[Address], Allocation | None] = lambda addr: None
        self.sock: socket.socket | None = None
        self.local: Address = ("0.0.0.0", 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.local = transport.get_extra_info("sockname")[:2]
        self.allocation = self.server.core.table.udp_clients(self.local)  # by client address
        listening = transport.get_extra_info("socket")
        self.sock = socket.socket(
            listening.family, socket.SOCK_DGRAM, 0, os.dup(listening.fileno())
        )
        self.sock.setblocking(False)
        # The event loop looks datagram_received up for every datagram: as an instance
        # attribute it is this closure, with no bound method to make and no attribute to load.
        self.datagram_received = self._receiver(listening.family == socket.AF_INET6)  # type: ignore[method-assign]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sock is not None:
            self.sock.close()

    def send(self, data: bytes, addr: Address) -> None:
        assert self.sock is not None
        try:
            self.sock.sendto(data, addr)
        except OSError:  # the socket's buffer is full, or an ICMP error came back
            self.server.core.stats.client_write_drops += 1

    def sender(self, addr: Address) -> Callable[[bytes], None]:
        """How an allocation sends to its client at `addr` (once per relayed datagram)."""
        assert self.sock is not None
        sendto, stats = self.sock.sendto, self.server.core.stats

        def send(data: bytes) -> None:
            try:
                sendto(data, addr)
            except OSError:  # the socket's buffer is full, or an ICMP error came back
                stats.client_write_drops += 1

        return send

    def _receiver(self, ipv6: bool) -> Callable[[bytes, tuple], None]:
        server, core, allocation, send = self.server, self.server.core, self.allocation, self.send

        def datagram_received(data: bytes, addr: tuple) -> None:
            try:
                if ipv6:
                    addr = addr[:2]  # IPv6 sockets add flowinfo and scope
                # ChannelData (channels 0x4000-0x7FFF, see datapath.is_channel), the hot path;
                # anything else with a first byte of 0x80-0xFF is garbage that TurnCore drops.
                if len(data) >= 4 and data[0] in CHANNEL_FIRST_BYTES:
                    found = allocation(addr)
                    if found is not None:
                        found.from_client_channel(data)
                    return
                head = data[:2]
                if head == SEND_INDICATION:  # Firefox relays in these, never on channels
                    core.relay_indication(allocation(addr), data)
                    return
                if head == BINDING_REQUEST:  # the commonest request, answered the short way
                    reply = core.answer_binding(data, addr)
                    if reply is not None:
                        send(reply, addr)
                        return
                reply = server.handle(data, Client("udp", addr, self.local, self.sender(addr)))
                if reply is not None:
                    send(reply, addr)
            except Exception:
                server.fault("udp", "a UDP datagram failed; dropped it")  # costs this datagram

        return datagram_received

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors for one client say nothing about the others


class StreamConnection(asyncio.Protocol):
    """One TURN client over TCP or TLS: a 5-tuple of its own, with at most one allocation."""

    def __init__(self, server: TurnServer, transport_name: str) -> None:
        self.server = server
        self.core = server.core
        self.name = transport_name
        self.framer = StreamFramer()
        self.allocations = server.core.table.by_tuple
        self.transport: asyncio.Transport | None = None
        self.client: Client | None = None
        self.five_tuple: FiveTuple = ("", ("", 0), ("", 0))
        self.opened = time.monotonic()
        self._idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        try:
            remote = transport.get_extra_info("peername")
            local = transport.get_extra_info("sockname")
            if remote is None or local is None:
                # Reset before it was accepted: uvloop then has no peer name. Not a fault.
                self.core.stats.connections_reset += 1
                transport.abort()
                return
            self.client = Client(self.name, remote[:2], local[:2], self._send)
            self.five_tuple = self.client.five_tuple
            self.server.connections.add(self)
            self.core.stats.count_connection(self.name)
            self._arm_idle_timer()
        except Exception:
            self._fault("a new connection failed; closed it")

    def _fault(self, what: str) -> None:
        """A bug costs this connection only (call from an `except` block)."""
        self.server.fault(self.name, f"{self.name.upper()}: {what}")
        if self.transport is not None:
            self.transport.abort()

    def _send(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size() < TCP_MAX_BUFFERED:
            transport.write(data)
        elif transport is not None:
            self.core.stats.client_write_drops += 1

    def data_received(self, data: bytes) -> None:
        try:
            self._received(data)
        except Exception:
            self._fault("a message failed; closed the connection")

    def _received(self, data: bytes) -> None:
        if self.transport is None or self.client is None:
            return  # aborted in connection_made
        try:
            frames = self.framer.feed(data)
        except FramingError:
            self.server.ratelog("framing", "closed a TCP connection that sent garbage")
            self.transport.close()
            return
        for frame in frames:
            if frame[0] in CHANNEL_FIRST_BYTES:
                allocation = self.allocations.get(self.five_tuple)
                if allocation is not None:
                    allocation.from_client_channel(frame)
                continue
            if frame[:2] == SEND_INDICATION:  # as over UDP: no answer, no new state
                self.core.relay_indication(self.allocations.get(self.five_tuple), frame)
                continue
            reply = self.server.handle(frame, self.client)
            if reply is not None:
                self._send(reply)  # dropped past TCP_MAX_BUFFERED, like relay data
            self.framer.channels_allowed = self.five_tuple in self.allocations

    def pause_writing(self) -> None:
        # The client does not read its answers: stop reading its requests (TCP backpressure).
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        try:
            self.core.drop_client(self.five_tuple)  # a no-op before connection_made
        except Exception:
            self.server.fault(self.name, f"{self.name.upper()}: closing a connection failed")

    def idle(self, now: float) -> bool:
        return self.five_tuple not in self.allocations and now - self.opened > TCP_IDLE_TIMEOUT

    def _arm_idle_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(TCP_IDLE_TIMEOUT, self._idle_timeout)

    def _idle_timeout(self) -> None:
        try:
            self.check_idle(time.monotonic())
        except Exception:
            self._fault("the idle check failed; closed the connection")

    def check_idle(self, now: float) -> None:
        """Close the connection if it has had no allocation for TCP_IDLE_TIMEOUT; else look
        again then (one timer per connection: nothing walks them all)."""
        if self.transport is None:
            return
        if self.idle(now):
            self.transport.close()
        else:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            self._arm_idle_timer()


@dataclass(frozen=True)
class Listeners:
    """Listening sockets bound elsewhere: a TURN worker's own SO_REUSEPORT sockets, which the
    supervisor holds for it (docs/turn.md, "Workers"). TCP and TLS are listening already."""

    udp: socket.socket
    tcp: socket.socket
    tls: socket.socket | None = None


class TurnServer:
    """STUN/TURN on UDP and TCP (and TLS with a certificate), relays on UDP.

    As a TURN worker (workers.py) it serves on `listeners` it is given, opens relays on its
    `relay_ports` slice of the range only, counts users' allocations in `user_counts`, and
    signs nonces and RESERVATION-TOKENs with the workers' common keys."""

    def __init__(
        self,
        settings: Settings,
        secret: str | None = None,
        *,
        listeners: Listeners | None = None,
        relay_ports: tuple[int, int] | None = None,
        user_counts: UserCounts | None = None,
        nonce_key: bytes | None = None,
        reservation_key: bytes | None = None,
    ) -> None:
        self.settings = settings
        self.secret = secret if secret is not None else settings.secret
        self.listeners = listeners
        self.relay_ports = relay_ports or settings.relay_ports
        self.user_counts = user_counts
        self.nonce_key = nonce_key  # shared by workers: a restarted one takes their nonces
        self.reservation_key = reservation_key  # shared too: any worker takes a reserved port
        self.ratelog = RateLimitedLog(log)
        self.connections: set[StreamConnection] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._udp: asyncio.DatagramTransport | None = None
        self._tls: ssl.SSLContext | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf  # when self._timer fires
        self._timer_floor = 0.0  # no timer before this (set after a fault in the timers)
        # The core's two clocks (handlers.py): monotonic for lifetimes, Unix time for what
        # clients hold (nonces, REST usernames). Attributes, so a test can jump the wall clock.
        self.clock = time.monotonic
        self.wall_clock = time.time
        self.relays: RelayPorts
        self.policy: PeerPolicy
        self.core: TurnCore
        self.addresses: list[tuple[str, str, int]] = []
        self.self_test = SelfTest(settings, self.secret)
        self._binding = ("udp", "", 0)  # what _listen() binds now, for the error if it fails

    def fault(self, kind: str, message: str) -> None:
        """Count a bug and log it, rate-limited, with the traceback being handled the first time
        (every asyncio callback ends up here rather than in the loop's exception handler)."""
        self.core.stats.faults += 1
        self.ratelog.fault(kind, message)

    def handle(self, data: bytes, client: Client) -> bytes | None:
        """TurnCore.handle, but a bug in it costs one message, never the listener."""
        try:
            reply = self.core.handle(data, client, self.clock(), self.wall_clock())
        except Exception:
            self.fault("core", f"internal error handling a {client.transport} message")
            return None
        if reply is not None:  # only a request (answered) can bring a deadline forward
            self.arm_timers()
        return reply

    def arm_timers(self) -> None:
        """Have the loop call the core's timers at its next deadline (and only then)."""
        deadline = self.core.next_deadline()
        if deadline is None:
            return
        deadline = max(deadline, self._timer_floor)
        if deadline >= self._timer_at:
            return  # already due by then; a timer that fires early finds nothing and re-arms
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, deadline - self.clock()), self._on_timers)

    def _on_timers(self) -> None:
        self._timer, self._timer_at = None, math.inf
        try:
            self.core.handle_timers(self.clock())
        except Exception:
            self.fault("timer", "the expiry timer failed")
            self._timer_floor = self.clock() + TIMER_FAULT_BACKOFF  # do not spin on a bug
        self.arm_timers()

    async def start(self) -> None:
        s = self.settings
        if not (s.users or self.secret) and self.listeners is None:  # workers: the supervisor says
            log.warning("no --user and no --secret: every TURN request will be refused")
        loop = asyncio.get_running_loop()
        bind_ips = s.relay_bind_ips
        if self.reservation_key is None:
            # One process: relay to relay through --external-ip never reaches a socket (the core
            # hands it over, docs/turn.md), so no Hairpin is needed on the peer path.
            self.relays = RelayPorts(bind_ips, self.relay_ports, loop, on_fault=self._relay_fault)
        else:
            self.relays = SharedRelayPorts(
                bind_ips,
                self.relay_ports,
                loop,
                on_fault=self._relay_fault,
                hairpin=hairpin(s),
                token_key=self.reservation_key,
                whole_range=s.relay_ports,
            )
        own = [ip for ip in (*s.relay_ips, s.external_ip, s.turn_host) if ip]
        self.policy = policy = PeerPolicy(
            allow=s.allow_peers,
            deny=s.deny_peers,
            own_addresses=own,
            relay_ports=s.relay_ports,
            listen_ports={s.turn_port, s.tls_port},
        )
        # Where relays are announced when they bind to a wildcard and nothing else says.
        fallback_ips = {family: _primary_ip(family == 2) for family in bind_ips}
        self.core = TurnCore(
            s,
            self.relays,
            policy,
            self.secret,
            nonces=Nonces(self.nonce_key) if self.nonce_key else None,
            fallback_ips=fallback_ips,
            user_counts=self.user_counts,
        )
        tls = self._tls_context()
        # Port 0 (tests) picks a free UDP port, which TCP may find taken: then try another.
        for attempt in range(1 if s.turn_port or self.listeners else 20):
            try:
                await self._listen(loop, tls)
                break
            except OSError as exc:
                await self.stop()
                if s.turn_port or exc.errno != errno.EADDRINUSE or attempt == 19:
                    transport, host, port = self._binding
                    reason = _os_reason(exc)
                    raise StartupError(
                        f"STUN/TURN cannot listen on {transport} {host}:{port}: {reason}"
                    ) from exc
        policy.listen_on(port for _, _, port in self.addresses)
        self._flusher = asyncio.create_task(self._flush_logs())
        self.arm_timers()
        if self.listeners is not None:
            return  # a worker: the supervisor says where it listens, and runs the self-test
        for transport_name, host, port in self.addresses:
            log.info("STUN/TURN listening on %s %s:%d", transport_name, host, port)
        low, high = s.relay_ports
        shown = " and ".join(bind_ips.values())
        log.info("relays on %s ports %d-%d, realm %r", shown, low, high, s.realm)
        if s.self_test:
            self.self_test.start(self.addresses)

    def _relay_fault(self) -> None:
        self.fault("relay", "relaying a datagram from a peer failed; dropped it")

    def _tls_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if not (s.tls_cert and s.tls_key):
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(s.tls_cert, s.tls_key)
        except (OSError, ssl.SSLError) as exc:
            reason = _os_reason(exc) if isinstance(exc, OSError) else str(exc)
            raise StartupError(
                f"cannot load --tls-cert {s.tls_cert} / --tls-key {s.tls_key}: {reason}"
            ) from exc
        return context

    async def _listen(self, loop: asyncio.AbstractEventLoop, tls: ssl.SSLContext | None) -> None:
        if self.listeners is not None:
            await self._serve_on(loop, self.listeners, tls)
            return
        s = self.settings
        self._binding = ("udp", s.turn_host, s.turn_port)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: UdpListener(self), local_addr=(s.turn_host, s.turn_port)
        )
        self._udp = transport
        with contextlib.suppress(OSError):
            transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21
            )
        port = transport.get_extra_info("sockname")[1]
        self.addresses.append(("udp", s.turn_host, port))
        self._binding = ("tcp", s.turn_host, port)
        tcp = await loop.create_server(
            lambda: StreamConnection(self, "tcp"), s.turn_host, port, reuse_address=True
        )
        self._servers.append(tcp)
        self.addresses.append(("tcp", s.turn_host, port))
        if tls is not None:
            self._binding = ("tls", s.turn_host, s.tls_port)
            self._tls = tls  # kept for reload_tls()
            listener = await loop.create_server(
                lambda: StreamConnection(self, "tls"), s.turn_host, s.tls_port, ssl=tls
            )
            self._servers.append(listener)
            self.addresses.append(("tls", s.turn_host, listener.sockets[0].getsockname()[1]))

    async def _serve_on(
        self, loop: asyncio.AbstractEventLoop, given: Listeners, tls: ssl.SSLContext | None
    ) -> None:
        host = self.settings.turn_host
        transport, _ = await loop.create_datagram_endpoint(
            lambda: UdpListener(self), sock=given.udp
        )
        self._udp = transport
        self.addresses.append(("udp", host, given.udp.getsockname()[1]))
        tcp = await loop.create_server(lambda: StreamConnection(self, "tcp"), sock=given.tcp)
        self._servers.append(tcp)
        self.addresses.append(("tcp", host, given.tcp.getsockname()[1]))
        if tls is not None and given.tls is not None:
            self._tls = tls
            listener = await loop.create_server(
                lambda: StreamConnection(self, "tls"), sock=given.tls, ssl=tls
            )
            self._servers.append(listener)
            self.addresses.append(("tls", host, given.tls.getsockname()[1]))

    async def _flush_logs(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            self.ratelog.flush(time.monotonic())

    def reload_tls(self) -> bool:
        """Load --tls-cert/--tls-key again (SIGHUP): new handshakes get the new certificate.

        Connections already open keep the session they negotiated. The files are tried in a
        scratch context first, so a half-written or mismatched pair leaves the old one in use.
        """
        s = self.settings
        if self._tls is None or not (s.tls_cert and s.tls_key):
            return False
        try:
            self._tls_context()
        except StartupError as exc:
            log.error("TLS certificate not reloaded, keeping the old one: %s", exc)
            return False
        self._tls.load_cert_chain(s.tls_cert, s.tls_key)
        log.info("TLS certificate reloaded from %s", s.tls_cert)
        return True

    async def stop(self) -> None:
        await self.self_test.stop()
        started = self._flusher is not None
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf
        for server in self._servers:
            server.close()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        self._servers.clear()
        self.addresses.clear()
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        self.core.table.close()
        self.relays.close()
        if started:
            self.ratelog.flush()  # the log's counts now add up to the fault counter
            stats = self.core.stats
            log.info(
                "STUN/TURN stopped; %d faults in all, %d connections reset before accepted",
                stats.faults,
                stats.connections_reset,
            )

    @property
    def port(self) -> int:
        return self.addresses[0][2]

    @property
    def running(self) -> bool:
        return bool(self.addresses)

    async def refresh(self) -> None:
        """Nothing to gather: every count is in this process (TurnWorkers has more to do)."""

    def workers_report(self) -> list[dict[str, object]] | None:
        return None  # no worker processes: the server runs in this one

    def stats(self) -> dict[str, int]:
        """Gauges (what is alive now) and counters (only go up): docs/turn.md, "Statistics"."""
        core = self.core
        open_now = {"tcp": 0, "tls": 0}
        for connection in self.connections:
            open_now[connection.name] += 1
        return {
            "allocations": len(core.table),
            "tcp_connections": len(self.connections),
            "open.tcp": open_now["tcp"],
            "open.tls": open_now["tls"],
            **core.stats.snapshot(core.table),
        }


def hairpin(settings: Settings) -> Hairpin | None:
    """Relay to relay through --external-ip, kept on this host (relay.Hairpin), or None."""
    external = settings.external_ip
    if external is None:
        return None
    family = family_of(external)
    real = settings.relay_bind_ips.get(family)
    if real is None:
        return None  # no relays of that family: --external-ip is never handed out
    if real in ("0.0.0.0", "::"):
        real = "::1" if family == 2 else "127.0.0.1"  # a wildcard relay answers on loopback
    return Hairpin(family, external, real, settings.relay_ports)


def _os_reason(exc: BaseException) -> str:
    """The operating system's words for an error ("Address already in use"), looking through
    the wrappers some loops add ("could not bind to local_addr ...")."""
    seen: BaseException | None = exc
    while seen is not None:
        number = getattr(seen, "errno", None)
        if isinstance(number, int) and number > 0:
            return os.strerror(number)
        seen = seen.__cause__ or seen.__context__
    return str(exc)


def _primary_ip(ipv6: bool) -> str:
    """The address this host would use to reach the Internet; loopback when there is none.

    A connected UDP socket sends nothing: connect() only asks the routing table."""
    family, probe = (socket.AF_INET6, "2001:4860::1") if ipv6 else (socket.AF_INET, "192.0.2.1")
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((probe, 9))
        return str(sock.getsockname()[0])
    return "::1" if ipv6 else "127.0.0.1"
