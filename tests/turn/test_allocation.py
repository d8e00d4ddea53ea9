"""Allocation rules through TurnCore, without sockets: the relay factory records what it sends."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from typing import Any

import pytest
from aioice import stun as aiostun
from aioice.stun import Class, Method

from p2pserver.config import Settings
from p2pserver.turn.allocation import (
    CHANNEL_LIFETIME,
    PERMISSION_LIFETIME,
    Address,
    Allocation,
    AllocationTable,
    NoCapacity,
    granted_lifetime,
)
from p2pserver.turn.auth import long_term_key
from p2pserver.turn.datapath import channel_data, data_indication, parse_send
from p2pserver.turn.handlers import Client, TurnCore
from p2pserver.turn.policy import PeerPolicy
from p2pserver.turn.stun import TurnMessage as Message
from p2pserver.turn.stun import parse_message

NOW = 1_800_000_000.0
PEER = ("8.8.8.8", 4000)


class RecordingRelay:
    def __init__(self, family: int, port: int) -> None:
        self.family = family
        self.address: Address = ("192.0.2.10", port)
        self.sent: list[tuple[bytes, Address]] = []
        self.dropped = 0
        self.closed = False
        self.on_datagram: Callable[[bytes, Address], None] | None = None

    def start(self, on_datagram: Callable[[bytes, Address], None]) -> None:
        self.on_datagram = on_datagram

    def sendto(self, data: bytes, peer: Address) -> None:
        self.sent.append((data, peer))

    def close(self) -> None:
        self.closed = True


class RecordingRelays:
    families = frozenset({1})

    def __init__(self, capacity: int = 100) -> None:
        self.capacity = capacity
        self.opened: list[RecordingRelay] = []
        self.reserved: dict[bytes, RecordingRelay] = {}

    def open(
        self, family: int, *, even_port: bool, reserve_next: bool, dont_fragment: bool
    ) -> tuple[RecordingRelay, bytes | None]:
        if len(self.opened) >= self.capacity:
            raise NoCapacity()
        relay = RecordingRelay(family, 50000 + 2 * len(self.opened))
        self.opened.append(relay)
        token = None
        if reserve_next:
            token = b"T%07d" % len(self.opened)
            self.reserved[token] = RecordingRelay(family, relay.address[1] + 1)
        return relay, token

    def take_reserved(self, token: bytes) -> RecordingRelay | None:
        return self.reserved.pop(token, None)

    def next_deadline(self) -> float | None:
        return None

    def expire(self, now: float) -> None:
        pass


class Harness:
    """A TurnCore plus one signed-in client on one 5-tuple."""

    def __init__(self, **settings: Any) -> None:
        defaults: dict[str, Any] = {"users": (("alice", "pw"), ("bob", "pw2")), "realm": "r"}
        defaults.update(settings)
        self.settings = Settings(http=False, **defaults)
        self.relays = RecordingRelays()
        policy = PeerPolicy(allow=self.settings.allow_peers, relay_ports=(50000, 60000))
        self.core = TurnCore(self.settings, self.relays, policy)
        self.to_client: list[bytes] = []
        self.client = Client(
            "udp", ("198.51.100.1", 5555), ("0.0.0.0", 3478), self.to_client.append
        )
        self.now = NOW
        self.wall: float | None = None  # the Unix time, when a test drives it apart from `now`

    def request(
        self,
        method: Method,
        attrs: dict[str, Any] | None = None,
        user: str = "alice",
        password: str = "pw",
        txid: bytes | None = None,
        client: Client | None = None,
    ) -> Message:
        client = client or self.client
        message = Message(method, Class.REQUEST, txid, dict(attrs or {}))
        message.attributes["USERNAME"] = user
        message.attributes["REALM"] = "r"
        wall = self.now if self.wall is None else self.wall
        message.attributes["NONCE"] = self.core.nonces.issue(client.remote[0], wall)
        message.add_message_integrity(long_term_key(user, "r", password))
        raw = self.core.handle(bytes(message), client, self.now, wall)
        assert raw is not None
        return parse_message(raw)

    def allocate(self, **attrs: Any) -> Message:
        base: dict[str, Any] = {"REQUESTED-TRANSPORT": 0x11000000}
        base.update(attrs)
        return self.request(Method.ALLOCATE, base)


def test_granted_lifetime() -> None:
    assert granted_lifetime(None, 600, 3600) == 600
    assert granted_lifetime(0, 600, 3600) == 0
    assert granted_lifetime(30, 600, 3600) == 600
    assert granted_lifetime(1200, 600, 3600) == 1200
    assert granted_lifetime(99999, 600, 3600) == 3600


def test_allocate_then_second_allocate_on_same_5_tuple_is_437() -> None:
    h = Harness()
    first = h.allocate()
    assert first.message_class == Class.RESPONSE
    assert first.attributes["LIFETIME"] == 600
    assert first.attributes["XOR-MAPPED-ADDRESS"] == h.client.remote
    assert h.allocate().error_code == 437


def test_retransmitted_allocate_gets_the_same_success() -> None:
    h = Harness()
    txid = b"retransmit!!"
    attrs = {"REQUESTED-TRANSPORT": 0x11000000}
    first = h.request(Method.ALLOCATE, attrs, txid=txid)
    again = h.request(Method.ALLOCATE, attrs, txid=txid)
    assert again.message_class == Class.RESPONSE
    assert again.attributes["XOR-RELAYED-ADDRESS"] == first.attributes["XOR-RELAYED-ADDRESS"]
    assert len(h.relays.opened) == 1


def test_allocate_validation_errors() -> None:
    h = Harness()
    assert h.request(Method.ALLOCATE, {}).error_code == 400
    assert h.allocate(**{"REQUESTED-TRANSPORT": 0x06000000}).error_code == 442
    assert h.allocate(**{"REQUESTED-ADDRESS-FAMILY": 2}).error_code == 440
    both = {"EVEN-PORT": False, "RESERVATION-TOKEN": b"12345678"}
    assert h.allocate(**both).error_code == 400
    assert h.allocate(**{"RESERVATION-TOKEN": b"nosuchtk"}).error_code == 508
    families = {"REQUESTED-ADDRESS-FAMILY": 1, "ADDITIONAL-ADDRESS-FAMILY": 2}
    assert h.allocate(**families).error_code == 400  # RFC 8656 §7.2: one or the other
    assert h.allocate(**{"ADDITIONAL-ADDRESS-FAMILY": 1}).error_code == 400  # must be IPv6
    assert h.relays.opened == []  # no state for any of them


def test_allocate_with_lifetime_zero_gets_the_default() -> None:
    h = Harness()
    assert h.allocate(LIFETIME=0).attributes["LIFETIME"] == 600


def test_even_port_with_reservation_then_allocate_with_the_token() -> None:
    h = Harness()
    first = h.allocate(**{"EVEN-PORT": True})
    token = first.attributes["RESERVATION-TOKEN"]
    port = first.attributes["XOR-RELAYED-ADDRESS"][1]
    assert port % 2 == 0
    other = Client("udp", ("198.51.100.1", 6666), h.client.local, h.to_client.append)
    second = h.request(
        Method.ALLOCATE,
        {"REQUESTED-TRANSPORT": 0x11000000, "RESERVATION-TOKEN": token},
        client=other,
    )
    assert second.attributes["XOR-RELAYED-ADDRESS"][1] == port + 1
    again = h.request(
        Method.ALLOCATE,
        {"REQUESTED-TRANSPORT": 0x11000000, "RESERVATION-TOKEN": token},
        client=Client("udp", ("198.51.100.1", 7777), h.client.local, h.to_client.append),
    )
    assert again.error_code == 508  # a token is good once


def test_a_reserved_port_that_cannot_be_bound_is_508() -> None:
    """A worker's token names a port it must bind anew (SharedRelayPorts), which can fail as
    open() can: the Allocate gets 508, not a fault and no answer."""

    class Unbindable(RecordingRelays):
        def take_reserved(self, token: bytes) -> RecordingRelay | None:
            raise NoCapacity("cannot bind a relay on 192.0.2.10")

    h = Harness()
    h.relays = Unbindable()
    h.core.relays = h.relays
    answer = h.allocate(**{"RESERVATION-TOKEN": b"t" * 8})
    assert answer.error_code == 508


def test_additional_address_family_is_answered_per_family() -> None:
    h = Harness()
    answer = h.allocate(**{"ADDITIONAL-ADDRESS-FAMILY": 2})
    assert answer.message_class == Class.RESPONSE
    assert answer.attributes["ADDRESS-ERROR-CODE"][:4] == bytes((2, 0, 4, 40))


def test_an_additional_family_without_a_relay_still_grants_the_first() -> None:
    class NoIPv6(RecordingRelays):
        families = frozenset({1, 2})

        def open(self, family: int, **options: Any) -> tuple[RecordingRelay, bytes | None]:
            if family == 2:
                raise NoCapacity("cannot bind a relay on 2001:db8::1")
            return super().open(family, **options)

    h = Harness()
    h.relays = NoIPv6()
    h.core.relays = h.relays
    answer = h.allocate(**{"ADDITIONAL-ADDRESS-FAMILY": 2})
    assert answer.message_class == Class.RESPONSE  # RFC 8656 §7.2: IPv4 granted
    assert answer.attributes["ADDRESS-ERROR-CODE"][:4] == bytes((2, 0, 5, 8))
    assert len(h.relays.opened) == 1


def test_quotas_486_per_user_and_508_when_full() -> None:
    h = Harness(user_quota=1, max_allocations=2)
    assert h.allocate().message_class == Class.RESPONSE
    second = Client("udp", ("198.51.100.1", 6000), h.client.local, h.to_client.append)
    a = h.request(Method.ALLOCATE, {"REQUESTED-TRANSPORT": 0x11000000}, client=second)
    assert a.error_code == 486
    b = h.request(
        Method.ALLOCATE,
        {"REQUESTED-TRANSPORT": 0x11000000},
        user="bob",
        password="pw2",
        client=second,
    )
    assert b.message_class == Class.RESPONSE
    third = Client("udp", ("198.51.100.1", 6001), h.client.local, h.to_client.append)
    assert h.request(
        Method.ALLOCATE,
        {"REQUESTED-TRANSPORT": 0x11000000},
        user="bob",
        password="pw2",
        client=third,
    ).error_code in (486, 508)
    h.relays.capacity = 0
    h.core.table.user_quota = 0
    h.core.table.max_allocations = 100
    fourth = Client("udp", ("198.51.100.1", 6002), h.client.local, h.to_client.append)
    c = h.request(Method.ALLOCATE, {"REQUESTED-TRANSPORT": 0x11000000}, client=fourth)
    assert c.error_code == 508  # no relay port


def test_requests_without_allocation_are_437_and_other_users_441() -> None:
    h = Harness()
    assert h.request(Method.REFRESH).error_code == 437
    assert h.request(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": PEER}).error_code == 437
    h.allocate()
    other = h.request(Method.REFRESH, user="bob", password="pw2")
    assert other.error_code == 441
    assert other.check_message_integrity(long_term_key("bob", "r", "pw2"))


def test_refresh_lifetime_and_delete() -> None:
    h = Harness()
    h.allocate()
    assert h.request(Method.REFRESH, {"LIFETIME": 1800}).attributes["LIFETIME"] == 1800
    assert h.request(Method.REFRESH, {"LIFETIME": 99999}).attributes["LIFETIME"] == 3600
    assert h.request(Method.REFRESH, {"REQUESTED-ADDRESS-FAMILY": 2}).error_code == 443
    assert h.request(Method.REFRESH, {"LIFETIME": 0}).attributes["LIFETIME"] == 0
    assert h.relays.opened[0].closed
    assert len(h.core.table) == 0


def test_allocation_expires() -> None:
    h = Harness()
    h.allocate()
    h.core.handle_timers(NOW + 599)
    assert len(h.core.table) == 1
    h.core.handle_timers(NOW + 600)
    assert len(h.core.table) == 0 and h.relays.opened[0].closed


def test_wall_clock_jump_changes_no_lifetime() -> None:
    """Lifetimes run on the monotonic clock (`now`); the wall clock (`wall`) only signs nonces
    and REST usernames. Jumping it a day either way expires and extends nothing."""
    h = Harness()
    h.now, h.wall = 5000.0, NOW  # seconds since boot, and the Unix time
    h.allocate()
    allocation = next(iter(h.core.table))
    bind = {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": PEER}
    assert h.request(Method.CHANNEL_BIND, bind).message_class == Class.RESPONSE
    permit = {"XOR-PEER-ADDRESS": ("1.1.1.1", 1)}
    assert h.request(Method.CREATE_PERMISSION, permit).message_class == Class.RESPONSE
    assert h.core.table.next_deadline() == 5000.0 + PERMISSION_LIFETIME
    for jump in (86400.0, -86400.0):
        h.wall = NOW + jump
        h.core.handle_timers(5001.0)
        assert len(h.core.table) == 1 and set(allocation.permissions) == {"8.8.8.8", "1.1.1.1"}
        assert h.request(Method.REFRESH).attributes["LIFETIME"] == 600  # signed at the new time
        assert allocation.expires == 5000.0 + 600  # from the monotonic clock, not the wall's
    h.core.handle_timers(5000.0 + PERMISSION_LIFETIME - 0.5)
    assert len(allocation.permissions) == 2
    h.core.handle_timers(5000.0 + PERMISSION_LIFETIME)
    assert allocation.permissions == {} and list(allocation.channels) == [0x4000]
    h.core.handle_timers(5000.0 + CHANNEL_LIFETIME - 0.5)
    assert len(h.core.table) == 1
    h.core.handle_timers(5000.0 + CHANNEL_LIFETIME)
    assert len(h.core.table) == 0 and h.core.table.next_deadline() is None


def test_timers_touch_only_what_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    """Expiry work is what expires: a timer run when one allocation's permission is due looks
    at that allocation only; refreshed permissions move back in line; a small budget leaves
    work for the next call, and the deadline says so."""
    h = Harness(user_quota=0)
    clients = [
        Client("udp", ("198.51.100.1", 6000 + i), ("0.0.0.0", 3478), h.to_client.append)
        for i in range(20)
    ]
    for i, client in enumerate(clients):
        h.now = NOW + i  # one allocation a second, each with three permissions
        h.client = client
        h.allocate()
        allocation = h.core.table.get(client.five_tuple)
        assert allocation is not None
        for k in range(3):
            allocation.permit(f"8.8.{i}.{k}", h.now)
        h.core.table.reschedule(allocation)
    looked_at: list[Any] = []
    original = Allocation.expire_due

    def counting(self: Allocation, now: float) -> int:
        looked_at.append(self)
        return original(self, now)

    monkeypatch.setattr(Allocation, "expire_due", counting)
    h.core.handle_timers(NOW + PERMISSION_LIFETIME - 0.5)
    assert looked_at == []  # nothing due: nothing walked
    first = h.core.table.get(clients[0].five_tuple)
    assert first is not None
    first.permit("8.8.0.0", NOW + 100)  # refreshed: now the last of its permissions to expire
    h.core.handle_timers(NOW + PERMISSION_LIFETIME)
    assert looked_at == [first] and list(first.permissions) == ["8.8.0.0"]
    looked_at.clear()
    h.core.handle_timers(NOW + PERMISSION_LIFETIME + 19, budget=5)  # 19 more are due
    assert len(looked_at) < 19
    deadline = h.core.next_deadline()
    assert deadline is not None and deadline <= NOW + PERMISSION_LIFETIME + 19  # work left
    h.core.handle_timers(NOW + PERMISSION_LIFETIME + 19)
    assert len(looked_at) == 19 and all(len(a.permissions) == 0 for a in looked_at)


def test_create_permission_all_or_nothing_and_expiry() -> None:
    h = Harness()
    h.allocate()
    allocation = next(iter(h.core.table))
    # Two good peers and one forbidden: 403, and neither good peer is installed.
    raw = _multi_peer_request(h, [PEER, ("1.1.1.1", 1), ("10.0.0.1", 1)])
    assert raw.error_code == 403
    assert allocation.permissions == {}
    ok = _multi_peer_request(h, [PEER, ("1.1.1.1", 1)])
    assert ok.message_class == Class.RESPONSE
    assert set(allocation.permissions) == {"8.8.8.8", "1.1.1.1"}
    assert _multi_peer_request(h, [("2001:4860::1", 1)]).error_code == 443
    assert h.request(Method.CREATE_PERMISSION).error_code == 400
    h.core.handle_timers(NOW + PERMISSION_LIFETIME)
    assert allocation.permissions == {}


def _multi_peer_request(h: Harness, peers: list[Address]) -> Message:
    """CreatePermission with several XOR-PEER-ADDRESS (aioice's dict holds only one)."""
    message = Message(Method.CREATE_PERMISSION, Class.REQUEST)
    body = b"".join(
        struct.pack("!HH", 0x0012, 20 if ":" in p[0] else 8)
        + aiostun.pack_xor_address(p, message.transaction_id)
        for p in peers
    )
    message.attributes.update(
        {"USERNAME": "alice", "REALM": "r", "NONCE": h.core.nonces.issue(h.client.remote[0], h.now)}
    )
    head = bytes(message)
    raw = head[:2] + (len(head) - 20 + len(body)).to_bytes(2) + head[4:20] + body + head[20:]
    # Sign by hand: MESSAGE-INTEGRITY over everything before it (RFC 8489 §14.5).
    key = long_term_key("alice", "r", "pw")
    mi = aiostun.message_integrity(raw, key)
    full = raw + struct.pack("!HH", 0x0008, 20) + mi
    full = full[:2] + (len(full) - 20).to_bytes(2) + full[4:]
    answer = h.core.handle(full, h.client, h.now)
    assert answer is not None
    return parse_message(answer)


def test_policy_refuses_private_and_loopback_peers_unless_allowed() -> None:
    h = Harness()
    h.allocate()
    for peer in (("127.0.0.1", 9), ("192.168.1.1", 9), ("169.254.169.254", 80)):
        assert h.request(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": peer}).error_code == 403
        bind = {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": peer}
        assert h.request(Method.CHANNEL_BIND, bind).error_code == 403
    lan = Harness(allow_peers=(ipaddress.ip_network("192.168.0.0/16"),))
    lan.allocate()
    ok = lan.request(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": ("192.168.1.1", 9)})
    assert ok.message_class == Class.RESPONSE


def test_channel_bind_rules() -> None:
    h = Harness()
    h.allocate()
    allocation = next(iter(h.core.table))

    def bind(number: int, peer: Address) -> Message:
        return h.request(Method.CHANNEL_BIND, {"CHANNEL-NUMBER": number, "XOR-PEER-ADDRESS": peer})

    assert bind(0x4000, ("2001:4860::1", 1)).error_code == 443  # IPv6 peer, IPv4 relay
    assert bind(0x3FFF, PEER).error_code == 400
    assert bind(0x8000, PEER).error_code == 400  # past RFC 5766's 0x7FFF
    assert h.request(Method.CHANNEL_BIND, {"CHANNEL-NUMBER": 0x4000}).error_code == 400
    assert bind(0x4000, PEER).message_class == Class.RESPONSE
    assert "8.8.8.8" in allocation.permissions  # ChannelBind installs the permission
    assert bind(0x4000, PEER).message_class == Class.RESPONSE  # refresh: same pair
    assert bind(0x4000, ("8.8.4.4", 1)).error_code == 400  # channel taken by another peer
    assert bind(0x4001, PEER).error_code == 400  # peer bound to another channel
    assert bind(0x4001, ("8.8.8.8", 4001)).message_class == Class.RESPONSE  # other port is fine
    h.request(Method.REFRESH, {"LIFETIME": 3600})  # keep the allocation past its channels
    h.core.handle_timers(NOW + CHANNEL_LIFETIME)
    assert allocation.channels == {} and allocation.peer_channels == {}
    h.now = NOW + CHANNEL_LIFETIME  # nonces follow the clock
    assert bind(0x4000, ("8.8.4.4", 1)).message_class == Class.RESPONSE  # free again


def test_data_path_needs_a_permission_both_ways() -> None:
    h = Harness()
    h.allocate()
    allocation = next(iter(h.core.table))
    relay = h.relays.opened[0]
    assert relay.on_datagram is not None
    relay.on_datagram(b"unasked", PEER)  # no permission: dropped, and counted
    assert h.to_client == []
    assert allocation.peer_denied == 1 and h.core.stats.snapshot(h.core.table)["peer_denied"] == 1
    h.request(Method.CHANNEL_BIND, {"CHANNEL-NUMBER": 0x4001, "XOR-PEER-ADDRESS": PEER})
    h.to_client.clear()
    relay.on_datagram(b"hello", PEER)
    assert h.to_client == [channel_data(0x4001, b"hello", pad=False)]
    relay.on_datagram(b"other port", ("8.8.8.8", 4001))  # same IP, no channel: Data indication
    indication = parse_message(h.to_client[-1])
    assert indication.message_method == Method.DATA
    assert indication.attributes["XOR-PEER-ADDRESS"] == ("8.8.8.8", 4001)
    assert indication.attributes["DATA"] == b"other port"

    allocation.from_client_channel(channel_data(0x4001, b"out", pad=False))
    allocation.from_client_channel(channel_data(0x4002, b"unbound", pad=False))
    allocation.from_client_channel(b"\x40\x01\x00\x10abc")  # length lies: dropped
    assert relay.sent == [(b"out", PEER)]


def test_send_indication_relays_only_with_permission() -> None:
    h = Harness()
    h.allocate()
    relay = h.relays.opened[0]

    def send(peer: Address, data: bytes) -> None:
        m = Message(Method.SEND, Class.INDICATION, None, {"XOR-PEER-ADDRESS": peer, "DATA": data})
        assert parse_send(bytes(m)) == (peer, data)
        assert h.core.handle(bytes(m), h.client, h.now) is None  # indications get no answer

    send(PEER, b"no permission yet")
    h.request(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": PEER})
    send(PEER, b"now")
    send(("8.8.8.8", 9999), b"any port of a permitted IP")
    assert relay.sent == [(b"now", PEER), (b"any port of a permitted IP", ("8.8.8.8", 9999))]


def test_unauthenticated_requests_create_no_state() -> None:
    h = Harness()
    unsigned = Message(Method.ALLOCATE, Class.REQUEST, None, {"REQUESTED-TRANSPORT": 0x11000000})
    answer = parse_message(h.core.handle(bytes(unsigned), h.client, NOW) or b"")
    assert answer.error_code == 401
    assert answer.attributes["REALM"] == "r" and answer.attributes["NONCE"]
    wrong = h.request(Method.ALLOCATE, {"REQUESTED-TRANSPORT": 0x11000000}, password="nope")
    assert wrong.error_code == 401
    assert h.relays.opened == [] and len(h.core.table) == 0 and len(h.core.responses) == 0


def test_permissions_per_allocation_are_capped_with_508() -> None:
    h = Harness(max_permissions=2)
    h.allocate()
    allocation = next(iter(h.core.table))
    for ip in ("8.8.8.8", "8.8.4.4"):
        ok = h.request(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": (ip, 1)})
        assert ok.message_class == Class.RESPONSE
    third = h.request(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": ("1.1.1.1", 1)})
    assert third.error_code == 508
    bind = {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": ("1.1.1.1", 1)}
    assert h.request(Method.CHANNEL_BIND, bind).error_code == 508
    again = h.request(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": ("8.8.8.8", 2)})
    assert again.message_class == Class.RESPONSE  # refreshing one we have is always fine
    assert set(allocation.permissions) == {"8.8.8.8", "8.8.4.4"}


def _inside_pair(
    pad_b: bool = False, channel_b: int = 0x4ABC
) -> tuple[Allocation, Allocation, list[bytes]]:
    """Allocations A and B of one process (one inside table), A with channel 0x4000 to B's
    relayed address and B with `channel_b` to A's; returns what B's client gets."""
    policy = PeerPolicy(allow=(ipaddress.ip_network("192.0.2.0/24"),))
    table = AllocationTable(user_quota=0, max_allocations=10)
    to_b: list[bytes] = []
    pair = []
    for port, pad, sink in ((50000, False, lambda data: None), (50001, pad_b, to_b.append)):
        relay = RecordingRelay(1, port)
        allocation = Allocation(
            five_tuple=("udp", ("203.0.113.1", port), ("192.0.2.10", 3478)),
            username="user",
            key=b"k" * 16,
            relays={1: relay},
            relayed_addresses={1: relay.address},
            expires=NOW + 600,
            send_to_client=sink,
            permits=policy.permits,
            pad=pad,
        )
        table.add(allocation)
        pair.append(allocation)
    a, b = pair
    assert a.bind_channel(0x4000, b.relayed_address, NOW) is None
    assert b.bind_channel(channel_b, a.relayed_address, NOW) is None
    return a, b, to_b


def test_relay_to_relay_inside_renumbers_the_frame_for_the_receivers_channel() -> None:
    """The hand-over inside (docs/turn.md, "Relay to relay") gives B's client what a datagram
    from A's relay would have given it: B's own channel number, no padding over UDP, padding
    to 4 bytes over TCP (RFC 8656 §12.5), nothing once B's permission is gone."""
    a, b, to_b = _inside_pair()
    a.from_client_channel(channel_data(0x4000, b"hello", pad=False))
    a.from_client_channel(channel_data(0x4000, b"padded", pad=True))  # UDP may pad (§12.5)
    assert to_b == [channel_data(0x4ABC, b"hello", False), channel_data(0x4ABC, b"padded", False)]
    assert (a.peer_sentp, a.peer_sentb, b.peer_rcvp, b.peer_rcvb) == (2, 11, 2, 11)
    del b.permissions[a.relayed_address[0]]  # as if it had expired while the channel lived on
    a.from_client_channel(channel_data(0x4000, b"late", pad=False))
    assert len(to_b) == 2 and b.peer_denied == 1 and a.peer_sentp == 3

    a, b, to_b = _inside_pair(pad_b=True)
    a.from_client_channel(channel_data(0x4000, b"odd", pad=False))
    assert to_b == [channel_data(0x4ABC, b"odd", True)]

    a, b, to_b = _inside_pair(channel_b=0x4000)  # the same number both ways, as browsers pick
    a.from_client_channel(channel_data(0x4000, b"same", pad=False))
    a.from_client_channel(channel_data(0x4000, b"pad", pad=True))
    assert to_b == [channel_data(0x4000, b"same", False), channel_data(0x4000, b"pad", False)]
    assert (b.peer_rcvp, b.peer_rcvb) == (2, 7)


def test_data_indications_carry_their_peer_and_fresh_transaction_ids() -> None:
    """What datapath keeps between Data indications (an IPv4 peer's attribute, a pool of
    random transaction ids) never shows: each is right for its peer, and no id repeats, also
    past a refill of the pool (RFC 8656 §11.6, RFC 8489 §6)."""
    txids = set()
    for peer in (("8.8.8.8", 4000), ("8.8.4.4", 4001), ("2001:4860::8888", 4000)):
        for size in range(300):
            payload = bytes([size % 251]) * size
            message = parse_message(data_indication(peer, payload))
            assert message.message_method == Method.DATA
            assert message.message_class == Class.INDICATION
            assert message.attributes["XOR-PEER-ADDRESS"] == peer
            assert message.attributes["DATA"] == payload
            txids.add(message.transaction_id)
    assert len(txids) == 900
