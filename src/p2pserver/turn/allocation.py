"""Allocations, their permissions and channels, the allocation table, and the relay hot path.

Times are plain floats passed in by the caller, so the rules here run the same in unit tests
without sockets or sleeps. Lifetimes are on the monotonic clock (`time.monotonic()` in the
server): a jump of the wall clock neither expires nor extends anything (docs/turn.md, "Timers").
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from p2pserver.turn.datapath import channel_data, data_indication
from p2pserver.turn.stats import TurnStats
from p2pserver.turn.timers import DeadlineWheel

Address = tuple[str, int]
FiveTuple = tuple[str, Address, Address]  # (transport, client address, server address)

DEFAULT_LIFETIME = 600  # RFC 8656 §7.2
MAX_LIFETIME = 3600
PERMISSION_LIFETIME = 300  # RFC 8656 §9
CHANNEL_LIFETIME = 600  # RFC 8656 §12

_CHANNEL_HEADER = struct.Struct("!HH")


class Relay(Protocol):
    """A relay socket: the I/O half of an allocation (see relay.py)."""

    family: int  # 1 = IPv4, 2 = IPv6, as in STUN address attributes
    address: Address  # where it is bound
    dropped: int  # datagrams the OS would not send

    def start(self, on_datagram: Callable[[bytes, Address], None]) -> None: ...

    def sendto(self, data: bytes, peer: Address) -> None: ...

    def close(self) -> None: ...


class RelayFactory(Protocol):
    """Opens relay sockets on ports of the relay range (relay.py is the real one)."""

    families: frozenset[int]  # the address families it can relay for

    def open(
        self, family: int, *, even_port: bool, reserve_next: bool, dont_fragment: bool
    ) -> tuple[Relay, bytes | None]:
        """A new relay; with reserve_next also the RESERVATION-TOKEN of port + 1. Raises
        NoCapacity when no port is free."""
        ...

    def take_reserved(self, token: bytes) -> Relay | None:
        """The relay a RESERVATION-TOKEN kept, or None; NoCapacity as open() raises it."""
        ...

    def next_deadline(self) -> float | None:
        """When the first unused EVEN-PORT reservation runs out (monotonic clock)."""
        ...

    def expire(self, now: float) -> None:
        """Close the reservations that ran out by `now`."""
        ...


class UserCounts(Protocol):
    """Allocations users hold in other TURN worker processes (quota.SharedUserCounts)."""

    def elsewhere(self, username: str) -> int: ...

    def add(self, username: str, delta: int) -> None: ...


class NoCapacity(Exception):
    """No relay port could be had: 508 (RFC 8656 §7.2)."""


def granted_lifetime(requested: int | None, default: int, maximum: int) -> int:
    """RFC 8656 §7.2 and §7.3: min(requested, max), but never below the default; 0 stays 0."""
    if requested is None:
        return default
    if requested == 0:
        return 0
    return max(default, min(requested, maximum))


def family_of(ip: str) -> int:
    """The STUN address family of an IP: 1 = IPv4, 2 = IPv6."""
    return 2 if ":" in ip else 1


@dataclass
class Channel:
    number: int
    peer: Address
    expires: float
    relay: Relay  # the allocation's relay of the peer's family
    prefix: bytes = field(init=False)  # the number as ChannelData starts with it (§12.4)

    def __post_init__(self) -> None:
        self.prefix = self.number.to_bytes(2)


@dataclass(eq=False)  # compared and hashed by identity: the timer wheel holds them
class Allocation:
    five_tuple: FiveTuple
    username: str
    key: bytes  # the long-term key, to sign every response to this client
    # By address family (1 = IPv4, 2 = IPv6): one relay, or two for a dual-stack allocation
    # (RFC 8656 §7.2); permissions and channels are per family through their peer's IP.
    relays: dict[int, Relay]
    relayed_addresses: dict[int, Address]  # what clients see: --external-ip, else the relay's
    expires: float
    send_to_client: Callable[[bytes], object]
    # The peer policy's check for inbound datagrams; a channel's peer passed it at ChannelBind.
    permits: Callable[[str, int], bool]
    pad: bool = False  # ChannelData over TCP/TLS is padded to 4 bytes (RFC 8656 §12.5)
    # Both kept in the order of their expiry: every permission lives PERMISSION_LIFETIME and
    # every channel CHANNEL_LIFETIME from its last refresh, and a refresh moves it to the end,
    # so what expires first is always at the front (see expire_due).
    permissions: dict[str, float] = field(default_factory=dict)  # peer IP -> expiry
    channels: dict[int, Channel] = field(default_factory=dict)
    peer_channels: dict[Address, Channel] = field(default_factory=dict)  # by peer
    # The relayed addresses of this process's allocations (AllocationTable.inside, shared):
    # what is sent to one of them is delivered without a socket (deliver_inside).
    inside: dict[Address, tuple[Allocation, bool]] = field(default_factory=dict)
    # Relayed traffic (stats.py): payload from peers to the client, and from the client out.
    peer_rcvp: int = 0
    peer_rcvb: int = 0
    peer_sentp: int = 0
    peer_sentb: int = 0
    peer_denied: int = 0

    @property
    def relayed_address(self) -> Address:
        """The relayed address of the requested family (the first), for log lines."""
        return next(iter(self.relayed_addresses.values()))

    @property
    def send_drops(self) -> int:
        return sum(relay.dropped for relay in self.relays.values())

    def send_to_peer(self, payload: bytes, peer: Address) -> None:
        relay = self.relays.get(family_of(peer[0]))
        if relay is None:
            return  # no relay of the peer's family (a permission was checked for it: 443)
        inside = self.inside.get(peer)  # relay to relay in this process (see `inside`)
        if inside is None:
            relay.sendto(payload, peer)
        else:
            self.deliver_inside(payload, relay, *inside)
        self.peer_sentp += 1
        self.peer_sentb += len(payload)

    def deliver_inside(
        self, payload: bytes, relay: Relay, target: Allocation, advertised: bool
    ) -> None:
        """Hand a datagram for another allocation's relayed address to it directly, as if it
        had left `relay` and arrived there: it comes from this allocation's relayed address as
        the target's client knows it (the advertised one, e.g. --external-ip, when that is what
        was addressed; the bind address when that was), and passes the target's permissions,
        peer policy (unless it has a channel to that address) and counters in `from_peer`.
        Synchronous, so the order is kept."""
        source = self.relayed_addresses[relay.family] if advertised else relay.address
        target.from_peer(payload, source)

    # --- the hot path -----------------------------------------------------------------------

    def from_client_channel(self, data: bytes) -> None:
        """ChannelData from the client: strip the 4-byte header, send to the bound peer."""
        number, length = _CHANNEL_HEADER.unpack_from(data)
        channel = self.channels.get(number)
        if channel is None or length > len(data) - 4:
            return  # RFC 8656 §12.6: unbound channel or short message, discard
        peer = channel.peer
        if peer[0] not in self.permissions:
            return  # the permission expired while the channel lived on
        inside = self.inside.get(peer)  # relay to relay in this process: no socket
        if inside is None:
            channel.relay.sendto(data[4 : 4 + length], peer)
        else:  # deliver_inside, written out: the commonest relayed call, where the calls cost
            # a third (bench/README.md, "Relay to relay, taken further")
            target, advertised = inside
            relay = channel.relay
            source = self.relayed_addresses[relay.family] if advertised else relay.address
            back = target.peer_channels.get(source)
            if (
                back is not None
                and length + 4 == len(data)
                and not target.pad
                and source[0] in target.permissions
            ):  # from_peer's commonest case: the same frame under the target's channel number,
                # as it is when both use the same (browsers number their channels from 0x4000)
                target.send_to_client(data if back.number == number else back.prefix + data[2:])
                target.peer_rcvp += 1
                target.peer_rcvb += length
            else:  # a Data indication, padding, or a denial
                target.from_peer(data[4 : 4 + length], source)
        self.peer_sentp += 1
        self.peer_sentb += length

    def from_peer(self, data: bytes, peer: Address) -> None:
        """A datagram on the relay socket: to the client as ChannelData or a Data indication.
        Its channel case is written out again in from_client_channel's relay-to-relay branch:
        a change here goes there too."""
        if peer[0] not in self.permissions:
            self.peer_denied += 1
            return  # RFC 8656 §11.4: drop silently
        channel = self.peer_channels.get(peer)
        size = len(data)
        if channel is None:
            if not self.permits(*peer):  # a channel's peer passed it at ChannelBind
                self.peer_denied += 1
                return  # docs/turn.md "Peer policy": drop silently
            self.send_to_client(data_indication(peer, data))
        elif self.pad and size & 3:
            self.send_to_client(channel_data(channel.number, data, True))
        else:  # channel_data without the call (RFC 8656 §12.4)
            self.send_to_client(_CHANNEL_HEADER.pack(channel.number, size) + data)
        self.peer_rcvp += 1
        self.peer_rcvb += size

    # --- the rules around it ---------------------------------------------------------------

    def permit(self, ip: str, now: float) -> None:
        self.permissions.pop(ip, None)  # to the end: the expiry order (see `permissions`)
        self.permissions[ip] = now + PERMISSION_LIFETIME

    def bind_channel(self, number: int, peer: Address, now: float) -> str | None:
        """Bind or refresh a channel (RFC 8656 §12.2); returns why not, or None on success."""
        relay = self.relays.get(family_of(peer[0]))
        if relay is None:
            return "No relay of the peer's address family"  # the handler answers 443 first
        current = self.channels.get(number)
        if current is not None and current.peer != peer:
            return "Channel already bound to another peer"
        bound = self.peer_channels.get(peer)
        if bound is not None and bound.number != number:
            return "Peer already bound to another channel"
        if current is None:
            current = Channel(number, peer, 0.0, relay)
            self.peer_channels[peer] = current
        else:
            del self.channels[number]  # to the end: the expiry order (see `permissions`)
        self.channels[number] = current
        current.expires = now + CHANNEL_LIFETIME
        self.permit(peer[0], now)  # a ChannelBind also installs or refreshes the permission
        return None

    def next_deadline(self) -> float:
        """When something of this allocation next expires: itself, a permission or a channel."""
        deadline = self.expires
        for expires in self.permissions.values():  # the first is the earliest
            deadline = min(deadline, expires)
            break
        for channel in self.channels.values():
            deadline = min(deadline, channel.expires)
            break
        return deadline

    def expire_due(self, now: float) -> int:
        """Expire the permissions and channels due at `now`, from the front (the expiry order):
        the work is what expires, never what lives. Returns how many went."""
        # One pass over the due front, then the deletions: asking a dict for its first item
        # again after each deletion would walk the holes the deletions leave (quadratic).
        ips = []
        for ip, expires in self.permissions.items():
            if expires > now:
                break
            ips.append(ip)
        for ip in ips:
            del self.permissions[ip]
        channels = []
        for channel in self.channels.values():
            if channel.expires > now:
                break
            channels.append(channel)
        for channel in channels:
            del self.channels[channel.number]
            del self.peer_channels[channel.peer]
        return len(ips) + len(channels)


class AllocationTable:
    """All allocations by 5-tuple (RFC 8656 §2.2: one allocation per 5-tuple), with quotas."""

    def __init__(
        self,
        user_quota: int,
        max_allocations: int,
        stats: TurnStats | None = None,
        elsewhere: UserCounts | None = None,
    ) -> None:
        self.user_quota = user_quota
        self.max_allocations = max_allocations
        self.stats = stats if stats is not None else TurnStats()
        self.elsewhere = elsewhere  # with worker processes: the user quota holds across them
        self.by_tuple: dict[FiveTuple, Allocation] = {}
        # UDP allocations by listener address, then client address: what a UDP listener looks
        # up per datagram (udp_clients), without building and hashing the whole 5-tuple.
        self._udp: dict[Address, dict[Address, Allocation]] = {}
        self.per_user: Counter[str] = Counter()
        # Relay to relay (docs/turn.md, "Relay to relay"): each relay's relayed address as
        # clients see it (advertised, True) and its bind address when that differs (False).
        self.inside: dict[Address, tuple[Allocation, bool]] = {}
        # Each allocation once, at the earliest deadline it has (Allocation.next_deadline).
        self._timers: DeadlineWheel[Allocation] = DeadlineWheel()

    def __len__(self) -> int:
        return len(self.by_tuple)

    def __iter__(self) -> Iterator[Allocation]:
        return iter(list(self.by_tuple.values()))

    def get(self, five_tuple: FiveTuple) -> Allocation | None:
        return self.by_tuple.get(five_tuple)

    def quota_error(self, username: str) -> int | None:
        """486 when this user has its quota, 508 when the server is full, else None."""
        if self.user_quota:
            held = self.per_user[username]
            if self.elsewhere is not None:
                held += self.elsewhere.elsewhere(username)
            if held >= self.user_quota:
                return 486
        if len(self.by_tuple) >= self.max_allocations:
            return 508
        return None

    def add(self, allocation: Allocation) -> None:
        self.by_tuple[allocation.five_tuple] = allocation
        transport, remote, local = allocation.five_tuple
        if transport == "udp":
            self._udp.setdefault(local, {})[remote] = allocation
        self.per_user[allocation.username] += 1
        if self.elsewhere is not None:
            self.elsewhere.add(allocation.username, 1)
        self.stats.allocations_created += 1
        self.reschedule(allocation)
        allocation.inside = self.inside
        for address, advertised in _relay_addresses(allocation):
            self.inside[address] = (allocation, advertised)

    def udp_clients(self, local: Address) -> Callable[[Address], Allocation | None]:
        """Look up the allocation of a UDP client of the listener at `local` by the client's
        address: the listener's per-datagram lookup (the mapping lives as long as the table)."""
        return self._udp.setdefault(local, {}).get

    def local_relay(self, address: Address) -> Allocation | None:
        """The allocation of this process whose relay `address` is (its relayed address as
        clients see it, or its bind address), else None."""
        entry = self.inside.get(address)
        return entry[0] if entry is not None else None

    def reschedule(self, allocation: Allocation) -> None:
        """Call after anything that may bring an allocation's next deadline forward (a new
        allocation, permission or channel, a shorter lifetime). A later deadline needs no call:
        the allocation comes out early, has nothing due and is scheduled again."""
        self._timers.schedule(allocation, allocation.next_deadline())

    def next_deadline(self) -> float | None:
        return self._timers.next_deadline()

    def handle_timers(self, now: float, budget: int) -> list[Allocation]:
        """Expire what is due at `now`: whole allocations (removed and returned), and the
        permissions and channels of the others. Stops after about `budget` units of work (an
        allocation looked at or an item expired is 1, removing an allocation with its sockets
        16), so one call never stalls the event loop long; returns the removed allocations (work
        left over shows as a deadline already due)."""
        removed: list[Allocation] = []
        work = 0
        while work < budget:
            allocation = self._timers.pop_due(now)
            if allocation is None:
                return removed
            work += 1
            if allocation.expires <= now:
                self.remove(allocation.five_tuple)
                removed.append(allocation)
                work += 16
            else:
                work += allocation.expire_due(now)
                self.reschedule(allocation)
        return removed

    def remove(self, five_tuple: FiveTuple) -> Allocation | None:
        allocation = self.by_tuple.pop(five_tuple, None)
        if allocation is not None:
            transport, remote, local = five_tuple
            if transport == "udp":
                self._udp[local].pop(remote, None)
            self._timers.cancel(allocation)
            for address, _ in _relay_addresses(allocation):
                if self.inside.get(address, (None,))[0] is allocation:
                    del self.inside[address]
            self.per_user[allocation.username] -= 1
            if self.elsewhere is not None:
                self.elsewhere.add(allocation.username, -1)
            if self.per_user[allocation.username] <= 0:
                del self.per_user[allocation.username]
            for relay in allocation.relays.values():
                relay.close()
            self.stats.retire(allocation)  # its traffic stays in the totals
        return allocation

    def close(self) -> None:
        for five_tuple in list(self.by_tuple):
            self.remove(five_tuple)


def _relay_addresses(allocation: Allocation) -> Iterator[tuple[Address, bool]]:
    """(address, advertised) for each relay: the relayed address clients are told, and the
    bind address too when it differs and is not a wildcard (nobody can address 0.0.0.0)."""
    for family, relay in allocation.relays.items():
        advertised = allocation.relayed_addresses[family]
        yield advertised, True
        bound = relay.address
        if bound != advertised and bound[0] not in ("0.0.0.0", "::"):
            yield bound, False
