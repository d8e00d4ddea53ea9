"""One TURN transport tested as a browser would use it: allocate, then relay both ways.

Used by `p2pserver check` (cli: from wherever the operator runs it) and by the start-up self-test
(selftest.py: the server against itself). The client is aioice's, the same library aiortc uses.
Two legs, each a ping that must come back (docs/operations.md, "The relay self-test"):

- relay to relay: allocation A sends to allocation B's relayed address and B answers. Two
  browsers that both need the relay meet this way.
- relay to peer: A sends to a plain UDP socket of ours, at the address the server sees for it
  (STUN), and that socket answers to A's *advertised* relayed address, as a browser on the
  Internet would. A wrong --external-ip or a closed relay port range breaks this leg only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aioice import stun
from aioice.turn import TurnTransport, create_turn_endpoint

Address = tuple[str, int]
PING_EVERY = 0.25  # resend a ping until its answer comes (UDP may lose the first ones)


@dataclass
class Leg:
    name: str
    ok: bool
    rtt_ms: float | None = None
    reason: str = ""


@dataclass
class ProbeResult:
    transport: str  # udp, tcp or tls
    server: Address
    ok: bool = False
    relayed: Address | None = None
    reason: str = ""
    legs: list[Leg] = field(default_factory=list)

    def line(self) -> str:
        """One line for a person: transport, verdict, round trips or the reason."""
        where = f"{self.transport} {_fmt(self.server)}"
        if not self.ok:
            return f"{where:<28} FAIL  {self.reason}"
        trips = ", ".join(f"{leg.name} {leg.rtt_ms or 0:.1f} ms" for leg in self.legs)
        relayed = _fmt(self.relayed) if self.relayed else "?"
        return f"{where:<28} ok    {trips} (relayed address {relayed})"

    def as_dict(self) -> dict[str, object]:
        return {
            "transport": self.transport,
            "server": _fmt(self.server),
            "ok": self.ok,
            "relayed": _fmt(self.relayed) if self.relayed else None,
            "reason": self.reason,
            "legs": {leg.name: leg.rtt_ms for leg in self.legs if leg.ok},
        }


class _Pinger(asyncio.DatagramProtocol):
    """Answers pings, times pongs, and keeps what went wrong with a send."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.pongs: dict[bytes, float] = {}  # token -> when its ping went out
        self.answered: asyncio.Future[float] | None = None
        self.pings_seen = 0
        self.errors: list[Exception] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.handle(data, addr)

    def handle(self, data: bytes, reply_to: Address) -> None:
        if data.startswith(b"ping:"):
            self.pings_seen += 1
            if self.transport is not None:
                self.transport.sendto(b"pong:" + data[5:], reply_to)
        elif data.startswith(b"pong:") and (sent := self.pongs.get(data[5:])) is not None:
            answered = self.answered
            if answered is not None and not answered.done():
                answered.set_result((time.monotonic() - sent) * 1000)

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)


class _Peer(_Pinger):
    """The plain UDP socket: learns its address by STUN, answers pings to `answer_to`."""

    def __init__(self) -> None:
        super().__init__()
        self.answer_to: Address | None = None
        self.mapped: asyncio.Future[Address] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if data[:1] in (b"\x00", b"\x01"):  # STUN (RFC 8489 §5): the Binding answer
            with contextlib.suppress(ValueError):
                message = stun.parse_message(data)
                mapped = message.attributes.get("XOR-MAPPED-ADDRESS")
                if mapped is not None and not self.mapped.done():
                    self.mapped.set_result(mapped)
            return
        self.handle(data, self.answer_to or addr)


async def _ping(send: Callable[[bytes], None], pinger: _Pinger, timeout: float) -> float | None:
    """Send pings until one is answered: that round trip in ms, or None at the timeout."""
    pinger.answered = answered = asyncio.get_running_loop().create_future()
    try:
        async with asyncio.timeout(timeout):
            while not answered.done():
                token = os.urandom(8).hex().encode()
                pinger.pongs[token] = time.monotonic()
                send(b"ping:" + token)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(answered), PING_EVERY)
        return answered.result()
    except TimeoutError:
        return None
    finally:
        pinger.pongs.clear()
        pinger.answered = None


async def _learn_address(
    transport: asyncio.DatagramTransport, peer: _Peer, stun_server: Address, timeout: float
) -> Address | None:
    """Our address as the server sees it: a Binding request (RFC 8489 §3) from this socket."""
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    try:
        async with asyncio.timeout(timeout):
            while not peer.mapped.done():
                transport.sendto(bytes(request), stun_server)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(peer.mapped), PING_EVERY * 2)
        return peer.mapped.result()
    except TimeoutError:
        return None


async def _allocate(
    server: Address, transport: str, username: str, password: str, timeout: float
) -> tuple[TurnTransport, _Pinger]:
    context = None
    if transport == "tls":
        # The check is about the relay, not the certificate (a browser would check it).
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return await asyncio.wait_for(
        create_turn_endpoint(
            _Pinger,
            server_addr=server,
            username=username,
            password=password,
            transport="udp" if transport == "udp" else "tcp",
            ssl=context,
        ),
        timeout,
    )


def _allocation_failure(exc: BaseException, transport: str, server: Address) -> str:
    where = f"{'UDP' if transport == 'udp' else 'TCP'} {server[1]}"
    if isinstance(exc, TimeoutError):
        return f"no answer from {_fmt(server)}: check that {where} is open (firewall, NAT)"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {_fmt(server)}: nothing listens on {where}"
    if isinstance(exc, stun.TransactionFailed):
        code, text = exc.response.attributes.get("ERROR-CODE", (0, ""))
        if code in (401, 441):
            return f"allocation refused ({code} {text}): the credentials do not work here"
        return f"allocation refused: {code} {text}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake with {_fmt(server)} failed: {exc.reason or exc}"
    return f"allocation failed: {type(exc).__name__}: {exc}"


async def probe(
    server: Address,
    transport: str,
    username: str,
    password: str,
    *,
    peer: bool = True,
    stun_server: Address | None = None,
    timeout: float = 5.0,
) -> ProbeResult:
    """Test one TURN transport: relay to relay, then (with `peer`) relay to a plain peer.

    The peer socket learns its public address from `stun_server`; without an answer it falls
    back to the address the TURN server saw (right when this host is not behind a NAT).
    """
    result = ProbeResult(transport, server)
    opened: list[TurnTransport] = []
    peer_transport: asyncio.DatagramTransport | None = None
    try:
        try:
            a, pa = await _allocate(server, transport, username, password, timeout)
            opened.append(a)
            b, pb = await _allocate(server, transport, username, password, timeout)
            opened.append(b)
        except (OSError, TimeoutError, stun.TransactionFailed, ConnectionError) as exc:
            result.reason = _allocation_failure(exc, transport, server)
            return result
        result.relayed = relayed_a = a.get_extra_info("sockname")
        result.legs.append(await _relay_leg(a, pa, b, pb, timeout))
        if peer:
            loop = asyncio.get_running_loop()
            family = socket.AF_INET6 if ":" in relayed_a[0] else socket.AF_INET
            peer_transport, plain = await loop.create_datagram_endpoint(
                _Peer, local_addr=("::" if family == socket.AF_INET6 else "0.0.0.0", 0)
            )
            mapped = None
            if stun_server is not None:
                mapped = await _learn_address(peer_transport, plain, stun_server, timeout)
            if mapped is None:
                seen_as = a.get_extra_info("related_address")
                mapped = (seen_as[0], peer_transport.get_extra_info("sockname")[1])
            plain.answer_to = relayed_a
            result.legs.append(
                await _peer_leg(a, pa, plain, peer_transport, mapped, relayed_a, timeout)
            )
        result.ok = all(leg.ok for leg in result.legs)
        result.reason = "; ".join(leg.reason for leg in result.legs if not leg.ok)
        return result
    finally:
        if peer_transport is not None:
            peer_transport.close()
        for relay in opened:
            relay.close()


async def _relay_leg(
    a: TurnTransport, pa: _Pinger, b: TurnTransport, pb: _Pinger, timeout: float
) -> Leg:
    relayed_a, relayed_b = a.get_extra_info("sockname"), b.get_extra_info("sockname")
    b.sendto(b"open", relayed_a)  # B's permission for A (RFC 8656 §9)
    rtt = await _ping(lambda data: a.sendto(data, relayed_b), pa, timeout)
    if rtt is not None:
        return Leg("relay-relay", True, rtt)
    if refused := _refusals(pa) or _refusals(pb):
        return Leg("relay-relay", False, reason=f"relay to relay refused: {refused}")
    return Leg(
        "relay-relay",
        False,
        reason=f"relay to relay failed: relayed address {_fmt(relayed_b)} is unreachable from "
        "the server itself: check --external-ip (this host's public address) and that the host "
        "can reach it (a NAT without hairpinning cannot)",
    )


async def stun_check(server: Address, timeout: float) -> tuple[Address | None, str]:
    """A Binding request over UDP: (our address as the server sees it, a line for a person)."""
    loop = asyncio.get_running_loop()
    transport, plain = await loop.create_datagram_endpoint(
        _Peer, family=socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    )
    try:
        mapped = await _learn_address(transport, plain, server, timeout)
    finally:
        transport.close()
    where = f"stun {_fmt(server)}"
    if mapped is None:
        return None, f"{where:<28} FAIL  no answer: check that UDP {server[1]} is open"
    return mapped, f"{where:<28} ok    this host is seen as {_fmt(mapped)}"


async def _peer_leg(
    a: TurnTransport,
    pa: _Pinger,
    peer: _Peer,
    peer_transport: asyncio.DatagramTransport,
    mapped: Address,
    relayed: Address,
    timeout: float,
) -> Leg:
    peer_transport.sendto(b"open", relayed)  # opens our own NAT towards the relay, if any
    rtt = await _ping(lambda data: a.sendto(data, mapped), pa, timeout)
    if rtt is not None:
        return Leg("relay-peer", True, rtt)
    if refused := _refusals(pa):
        return Leg(
            "relay-peer", False, reason=f"the server refuses to relay to {_fmt(mapped)}: {refused}"
        )
    if peer.pings_seen == 0:
        return Leg(
            "relay-peer",
            False,
            reason=f"the relay never delivered to {_fmt(mapped)}: the server cannot send "
            "out from its relay ports, or a firewall drops it",
        )
    return Leg(
        "relay-peer",
        False,
        reason=f"relayed address {_fmt(relayed)} unreachable from here: check --external-ip "
        "and that the relay ports (UDP 49152-65535 unless --relay-ports says otherwise) are open",
    )


def _refusals(pinger: _Pinger) -> str:
    for exc in pinger.errors:
        if isinstance(exc, stun.TransactionFailed):
            code, text = exc.response.attributes.get("ERROR-CODE", (0, ""))
            hint = " (a peer the policy denies: --allow-peer opens a range)" if code == 403 else ""
            return f"{code} {text}{hint}"
    return ""


def _fmt(address: Address | None) -> str:
    if address is None:
        return "?"
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
