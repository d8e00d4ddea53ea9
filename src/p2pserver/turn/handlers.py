"""The TURN protocol core: one handler per STUN/TURN method, authentication first.

`TurnCore.handle()` takes the bytes of one message, the client it came from and the time, and
returns the bytes to answer with (or None). It opens relays through an injected factory and
keeps no other I/O, so everything here runs in unit tests without an event loop. Its timers are
sans-I/O too: `next_deadline()` says when `handle_timers(now)` wants to run (docs/turn.md,
"Timers").

Two clocks come in: `now`, monotonic, for every lifetime (allocations, permissions, channels,
cached responses); `wall`, the Unix time, only where time is written into what clients hold (a
nonce's issue time, a TURN REST username's expiry).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aioice.stun import Class, Method

from p2pserver.config import Settings
from p2pserver.turn import stun
from p2pserver.turn.allocation import (
    DEFAULT_LIFETIME,
    MAX_LIFETIME,
    Address,
    Allocation,
    AllocationTable,
    FiveTuple,
    NoCapacity,
    RelayFactory,
    UserCounts,
    family_of,
    granted_lifetime,
)
from p2pserver.turn.auth import Credentials, Nonces, NonceStatus
from p2pserver.turn.datapath import is_channel, parse_send
from p2pserver.turn.policy import PeerPolicy
from p2pserver.turn.stats import TurnStats
from p2pserver.turn.stun import BadRequest, Malformed, Request
from p2pserver.turn.transactions import ResponseCache

log = logging.getLogger(__name__)

UDP = 17  # REQUESTED-TRANSPORT protocol number (RFC 8656 §14.7)
# Work units one handle_timers() call may do (allocation.AllocationTable.handle_timers): about
# 1 ms on this project's test machine, so expiry never stalls the event loop much longer.
TIMER_BUDGET = 2000
_BINDING = Method.BINDING  # once: an enum member's lookup costs a Binding answer 5 %


@dataclass(frozen=True, slots=True)
class Client:
    """Where a message came from: its 5-tuple, and how to answer it."""

    transport: str  # "udp", "tcp" or "tls"
    remote: Address
    local: Address
    send: Callable[[bytes], object]

    @property
    def five_tuple(self) -> FiveTuple:
        return (self.transport, self.remote, self.local)


class TurnCore:
    def __init__(
        self,
        settings: Settings,
        relays: RelayFactory,
        policy: PeerPolicy,
        secret: str | None = None,
        nonces: Nonces | None = None,
        fallback_ips: Mapping[int, str] | None = None,
        user_counts: UserCounts | None = None,
    ) -> None:
        self.settings = settings
        self.relays = relays
        self.policy = policy
        self.credentials = Credentials(settings.realm, dict(settings.users), secret)
        self.nonces = nonces or Nonces()
        self.stats = TurnStats()
        self.table = AllocationTable(
            settings.user_quota, settings.max_allocations, self.stats, user_counts
        )
        self.responses = ResponseCache()
        self.responder = stun.Responder(
            settings.software, settings.realm, on_error=self.stats.count_error
        )
        self.binding = stun.BindingAnswerer(settings.software)
        self.fallback_ips = dict(fallback_ips or {1: "127.0.0.1", 2: "::1"})  # see relayed_ip()
        self._relayed_ips: dict[tuple[str, int], str] = {}
        # Requests on an existing allocation (RFC 8656 §7.3, §10, §11): 437 without one.
        self._on_allocation: dict[int, Callable[[Request, Allocation, Client, float], bytes]] = {
            Method.REFRESH: self.refresh,
            Method.CREATE_PERMISSION: self.create_permission,
            Method.CHANNEL_BIND: self.channel_bind,
        }

    # --- dispatch ---------------------------------------------------------------------------

    def answer_binding(self, data: bytes, remote: Address) -> bytes | None:
        """The answer to a plain Binding request, by the fast path (stun.BindingAnswerer); None
        for anything else, which then goes to `handle`."""
        reply = self.binding.answer(data, remote)
        if reply is not None:  # the UDP listener's fast path
            self.stats.requests += 1
            self.stats.count_request(_BINDING, "udp")
        return reply

    def handle(
        self, data: bytes, client: Client, now: float, wall: float | None = None
    ) -> bytes | None:
        """Answer one STUN message (not ChannelData); None means send nothing.

        `now` is the monotonic clock, `wall` the Unix time; a caller that drives a single clock
        (unit tests) may give `now` alone, and it serves as both."""
        if wall is None:
            wall = now
        if data[:2] == stun.SEND_INDICATION:  # the listeners hand these over themselves
            self.relay_indication(self.table.get(client.five_tuple), data)
            return None
        if data[:2] == stun.BINDING_REQUEST:
            reply = self.answer_binding(data, client.remote)
            if reply is not None:
                return reply
        try:
            request = stun.decode(data)
        except Malformed:
            self.stats.dropped += 1
            return None
        except BadRequest as exc:
            self.stats.bad_requests += 1
            head = stun.header(data)
            assert head is not None  # decode() raised Malformed for anything without one
            extra = {"UNKNOWN-ATTRIBUTES": exc.unknown} if exc.unknown else None
            return self.responder.error(
                None,
                exc.code,
                str(exc),
                attributes=extra,
                method=head[0],
                transaction_id=data[8:20],
            )
        if request.cls == Class.INDICATION:
            return None  # a Binding indication is a keepalive; a broken Send was dropped above
        self.stats.requests += 1
        self.stats.count_request(request.method, client.transport)
        if request.method == Method.BINDING:
            return self.responder.success(request, {"XOR-MAPPED-ADDRESS": client.remote})

        cache_key = (client.five_tuple, request.transaction_id, request.method)
        cached = self.responses.get(cache_key, now)
        if cached is not None:
            return cached
        identity = self.authenticate(request, client, wall)
        if isinstance(identity, bytes):
            self.stats.unauthenticated += 1
            return identity
        username, key = identity
        if request.method == Method.ALLOCATE:
            response = self.allocate(request, client, username, key, now)
        else:
            allocation = self.table.get(client.five_tuple)
            if allocation is None:
                response = self.responder.error(request, 437, "No allocation here", key)
            elif allocation.username != username:
                response = self.responder.error(request, 441, key=key)  # RFC 8656 §5
            else:
                response = self._on_allocation[request.method](request, allocation, client, now)
        self.responses.put(cache_key, response, now)
        return response

    def authenticate(
        self, request: Request, client: Client, wall: float
    ) -> tuple[str, bytes] | bytes:
        """RFC 8489 §9.2.4, in its order. Returns (username, key) or the error to answer.
        `wall` is the Unix time: nonces and REST usernames carry it."""
        attrs = request.attributes
        if not request.signed:
            return self._challenge(request, client, wall, 401)
        username, realm, nonce = attrs.get("USERNAME"), attrs.get("REALM"), attrs.get("NONCE")
        if username is None or realm is None or nonce is None:
            return self.responder.error(request, 400, "Missing USERNAME, REALM or NONCE")
        if self.nonces.check(nonce, client.remote[0], wall) is not NonceStatus.VALID:
            return self._challenge(request, client, wall, 438)
        key = self.credentials.key(username, wall) if realm == self.credentials.realm else None
        if key is None or not request.check_integrity(key):
            return self._challenge(request, client, wall, 401)
        return username, key

    def _challenge(self, request: Request, client: Client, wall: float, code: int) -> bytes:
        return self.responder.challenge(request, code, self.nonces.issue(client.remote[0], wall))

    # --- handlers, one per method (RFC 8656 §7-§12) ----------------------------------------

    def allocate(
        self, request: Request, client: Client, username: str, key: bytes, now: float
    ) -> bytes:
        def error(code: int, reason: str | None = None) -> bytes:
            return self.responder.error(request, code, reason, key)

        attrs = request.attributes
        if self.table.get(client.five_tuple) is not None:
            return error(437, "Allocation already exists")
        transport = attrs.get("REQUESTED-TRANSPORT")
        if transport is None:
            return error(400, "REQUESTED-TRANSPORT missing")
        if transport >> 24 != UDP:
            return error(442)
        token = attrs.get("RESERVATION-TOKEN")
        even_port = attrs.get("EVEN-PORT")
        family = attrs.get("REQUESTED-ADDRESS-FAMILY")
        additional = attrs.get("ADDITIONAL-ADDRESS-FAMILY")
        if token is not None and (
            even_port is not None or family is not None or additional is not None
        ):
            return error(400, "RESERVATION-TOKEN with EVEN-PORT or an ADDRESS-FAMILY")
        if family is not None and additional is not None:
            return error(400, "REQUESTED- and ADDITIONAL-ADDRESS-FAMILY together")  # §7.2
        if additional is not None and additional != 2:
            return error(400, "ADDITIONAL-ADDRESS-FAMILY must be IPv6")
        family = family or 1
        if family not in self.relays.families:
            return error(440)
        quota = self.table.quota_error(username)
        if quota is not None:
            return error(quota)

        reservation: bytes | None = None
        try:
            if token is not None:
                relay = self.relays.take_reserved(token)
                if relay is None:
                    return error(508, "Unknown or expired RESERVATION-TOKEN")
            else:
                relay, reservation = self.relays.open(
                    family,
                    even_port=even_port is not None,
                    reserve_next=bool(even_port),
                    dont_fragment="DONT-FRAGMENT" in attrs,
                )
        except NoCapacity:  # RFC 8656 §7.2: the port (or any port) could not be had
            return error(508)
        relays = {relay.family: relay}
        # RFC 8656 §7.2: ADDITIONAL-ADDRESS-FAMILY asks for an IPv6 relayed address as well,
        # in the same allocation; when it cannot be had, the IPv4 one is still granted and
        # ADDRESS-ERROR-CODE says why for IPv6.
        address_error: tuple[int, str] | None = None
        if additional is not None:
            if additional not in self.relays.families:
                address_error = (440, "Address Family not Supported")
            else:
                try:
                    relays[additional], _ = self.relays.open(
                        additional,
                        even_port=False,
                        reserve_next=False,
                        dont_fragment="DONT-FRAGMENT" in attrs,
                    )
                except NoCapacity:
                    address_error = (508, "Insufficient Capacity")
        requested = attrs.get("LIFETIME") or None  # Allocate with LIFETIME 0: the default
        lifetime = granted_lifetime(requested, DEFAULT_LIFETIME, MAX_LIFETIME)
        allocation = Allocation(
            five_tuple=client.five_tuple,
            username=username,
            key=key,
            relays=relays,
            relayed_addresses={
                f: (self.relayed_ip(client, f), r.address[1]) for f, r in relays.items()
            },
            expires=now + lifetime,
            send_to_client=client.send,
            permits=self.policy.permits,
            pad=client.transport != "udp",
        )
        self.table.add(allocation)
        for each in relays.values():
            each.start(allocation.from_peer)
        log.info(
            "allocation %s for %s on %s %s:%d (%d s)",
            " and ".join(_show(a) for a in allocation.relayed_addresses.values()),
            username,
            client.transport,
            *client.remote,
            lifetime,
        )
        relayed = list(allocation.relayed_addresses.values())
        answer: dict[str, Any] = {
            # Two XOR-RELAYED-ADDRESS attributes for a dual-stack allocation (RFC 8656 §7.2).
            "XOR-RELAYED-ADDRESS": relayed[0] if len(relayed) == 1 else stun.Repeated(relayed),
            "LIFETIME": lifetime,
            "XOR-MAPPED-ADDRESS": client.remote,
        }
        if reservation is not None:
            answer["RESERVATION-TOKEN"] = reservation
        if address_error is not None:  # RFC 8656 §14.11: family, reserved, class, number
            code, reason = address_error
            value = bytes((additional or 2, 0, code // 100, code % 100)) + reason.encode()
            answer["ADDRESS-ERROR-CODE"] = value
        return self.responder.success(request, answer, key)

    def relayed_ip(self, client: Client, family: int) -> str:
        """The IP of the relayed address of `family`: --external-ip (if of that family), else
        the relay's bind address, else the address the client reached (if of that family),
        else the host's primary address of that family (`fallback_ips`).

        Whatever it is, it is this server's own, so the peer policy lets other allocations
        reach it (relay to relay) even when it is a private address."""
        chosen = self._relayed_ips.get((client.local[0], family))
        if chosen is not None:
            return chosen
        s = self.settings
        candidates = (
            s.external_ip,
            s.relay_bind_ips.get(family),
            client.local[0],
            self.fallback_ips.get(family),
        )
        chosen = next(
            ip
            for ip in candidates
            if ip and family_of(ip) == family and not ipaddress.ip_address(ip).is_unspecified
        )
        self.policy.add_own(chosen)
        # Settings do not change; only the listener address varies: decided once per address.
        self._relayed_ips[(client.local[0], family)] = chosen
        return chosen

    def refresh(
        self, request: Request, allocation: Allocation, client: Client, now: float
    ) -> bytes:
        key = allocation.key
        family = request.attributes.get("REQUESTED-ADDRESS-FAMILY")
        if family is not None and family not in allocation.relays:
            return self.responder.error(request, 443, key=key)  # RFC 8656 §7.3
        lifetime = granted_lifetime(
            request.attributes.get("LIFETIME"), DEFAULT_LIFETIME, MAX_LIFETIME
        )
        if lifetime == 0:
            self.table.remove(client.five_tuple)
            log.info("allocation %s deleted by its client", _show(allocation.relayed_address))
        else:
            allocation.expires = now + lifetime
            self.table.reschedule(allocation)  # a shorter lifetime brings its deadline forward
        return self.responder.success(request, {"LIFETIME": lifetime}, key)

    def create_permission(
        self, request: Request, allocation: Allocation, client: Client, now: float
    ) -> bytes:
        key = allocation.key
        if not request.peers:
            return self.responder.error(request, 400, "XOR-PEER-ADDRESS missing", key)
        for ip, _port in request.peers:  # all or nothing (RFC 8656 §10.2)
            if family_of(ip) not in allocation.relays:  # per family (RFC 8656 §9.1)
                return self.responder.error(request, 443, key=key)
            if not self.policy.permits_ip(ip):
                return self.responder.error(request, 403, "Peer address not allowed", key)
        new = {ip for ip, _ in request.peers} - allocation.permissions.keys()
        if len(allocation.permissions) + len(new) > self.settings.max_permissions:
            return self.responder.error(request, 508, "Too many permissions", key)
        for ip, _port in request.peers:
            allocation.permit(ip, now)
        self.table.reschedule(allocation)
        return self.responder.success(request, {}, key)

    def channel_bind(
        self, request: Request, allocation: Allocation, client: Client, now: float
    ) -> bytes:
        key = allocation.key
        number = request.attributes.get("CHANNEL-NUMBER")
        if number is None or not request.peers:
            return self.responder.error(
                request, 400, "CHANNEL-NUMBER or XOR-PEER-ADDRESS missing", key
            )
        if not is_channel(number >> 8):  # 0x4000-0x7FFF, see datapath.is_channel
            return self.responder.error(request, 400, "Channel number out of range", key)
        peer = request.peers[0]
        if family_of(peer[0]) not in allocation.relays:
            return self.responder.error(request, 443, key=key)
        if not self.policy.permits(*peer):
            return self.responder.error(request, 403, "Peer address not allowed", key)
        if (
            peer[0] not in allocation.permissions
            and len(allocation.permissions) >= self.settings.max_permissions
        ):
            return self.responder.error(request, 508, "Too many permissions", key)
        problem = allocation.bind_channel(number, peer, now)
        if problem is not None:
            return self.responder.error(request, 400, problem, key)  # RFC 8656 §12.2
        self.table.reschedule(allocation)
        return self.responder.success(request, {}, key)

    def relay_indication(self, allocation: Allocation | None, data: bytes) -> None:
        """RFC 8656 §11.3: relay a Send indication's DATA to its peer if the client's
        allocation (None: it has none) has a permission for it, else drop it. The listeners
        find the allocation as they do for ChannelData."""
        parsed = parse_send(data) if allocation is not None else None
        if parsed is None or allocation is None:
            self.stats.dropped += 1
            return
        peer, payload = parsed
        # A permitted IP is of the relay's family: CreatePermission checked that (443).
        if peer[0] not in allocation.permissions or not self.policy.permits(*peer):
            return
        allocation.send_to_peer(payload, peer)  # through the relay of the peer's family

    # --- timers (sans-I/O: the caller asks when, and calls back then) -------------------------

    def next_deadline(self) -> float | None:
        """The monotonic time at which `handle_timers` has work, or None when nothing waits.
        It may be in the past (work left over by the budget): then call again soon."""
        deadlines = [
            d
            for d in (
                self.table.next_deadline(),
                self.responses.next_deadline(),
                self.relays.next_deadline(),
            )
            if d is not None
        ]
        return min(deadlines) if deadlines else None

    def handle_timers(self, now: float, budget: int = TIMER_BUDGET) -> None:
        """Expire what is due at `now` (monotonic): allocations, permissions, channels, cached
        responses, EVEN-PORT reservations. The work is what expires, not what lives, and at most
        about `budget` units per call; what is left waits for the next call."""
        removed = self.table.handle_timers(now, budget)
        for allocation in removed:
            log.info("allocation %s expired", _show(allocation.relayed_address))
        self.responses.expire(now, limit=budget // 2)  # about as costly per entry as a unit
        self.relays.expire(now)  # a handful at most: one per EVEN-PORT Allocate

    def drop_client(self, five_tuple: FiveTuple) -> None:
        """A TCP/TLS client connection closed: its allocation goes with it (RFC 8656 §5)."""
        allocation = self.table.remove(five_tuple)
        if allocation is not None:
            log.info("allocation %s closed with its connection", _show(allocation.relayed_address))


def _show(address: Address) -> str:
    ip, port = address
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
