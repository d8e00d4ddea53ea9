"""The STUN/TURN server through real sockets on 127.0.0.1, request by request."""

from __future__ import annotations

import asyncio
import struct
import time

import pytest
from aioice import stun as aiostun
from aioice.stun import Class, Method
from stunclient import StunClient
from turnkit import PASSWORD, USER, ServerFactory

from p2pserver.turn.relay import RESERVATION_LIFETIME
from p2pserver.turn.server import TurnServer
from p2pserver.turn.stats import GAUGES
from p2pserver.turn.stun import TurnMessage as Message
from p2pserver.turn.stun import parse_message

TRANSPORTS = ["udp", "tcp"]


class Peer(asyncio.DatagramProtocol):
    """A plain UDP peer on 127.0.0.1 that records what reaches it."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.put_nowait((data, addr))

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[:2]


@pytest.fixture
async def peer() -> Peer:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    yield protocol
    assert protocol.transport is not None
    protocol.transport.close()


async def connect(server: TurnServer, transport: str) -> StunClient:
    return await StunClient.connect(("127.0.0.1", server.port), transport)


async def allocated(server: TurnServer, transport: str) -> tuple[StunClient, tuple[str, int]]:
    client = await connect(server, transport)
    await client.login(USER, PASSWORD)
    answer = await client.allocate()
    assert answer.message_class == Class.RESPONSE, answer
    return client, answer.attributes["XOR-RELAYED-ADDRESS"]


async def two_allocations(server: TurnServer) -> tuple[tuple[str, int], StunClient]:
    """A's relayed address, and client B (on another 5-tuple) that tries to reach it."""
    _, relayed_a = await allocated(server, "udp")
    b, _ = await allocated(server, "tcp")
    return relayed_a, b


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("fingerprint", [False, True])
async def test_binding(server: TurnServer, transport: str, fingerprint: bool) -> None:
    client = await connect(server, transport)
    answer = await client.request(Method.BINDING, sign=False, fingerprint=fingerprint)
    assert answer.message_class == Class.RESPONSE
    assert answer.attributes["XOR-MAPPED-ADDRESS"] == client.local
    assert answer.attributes["SOFTWARE"] == "p2pserver"
    assert ("FINGERPRINT" in answer.attributes) == fingerprint
    client.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_allocate_challenge_then_success(server: TurnServer, transport: str) -> None:
    client = await connect(server, transport)
    challenge = await client.login(USER, PASSWORD)
    assert challenge.attributes["REALM"] == "test.realm"
    assert challenge.attributes["NONCE"]
    answer = await client.allocate(lifetime=1200)
    assert answer.message_class == Class.RESPONSE
    relayed = answer.attributes["XOR-RELAYED-ADDRESS"]
    assert relayed[0] == "127.0.0.1" and 49152 <= relayed[1] <= 65535
    assert answer.attributes["XOR-MAPPED-ADDRESS"] == client.local
    assert answer.attributes["LIFETIME"] == 1200
    assert answer.check_message_integrity(client.key or b"")
    assert server.stats()["allocations"] == 1

    refreshed = await client.request(Method.REFRESH, {"LIFETIME": 700})
    assert refreshed.attributes["LIFETIME"] == 700 and refreshed.check_message_integrity(client.key)
    deleted = await client.request(Method.REFRESH, {"LIFETIME": 0})
    assert deleted.attributes["LIFETIME"] == 0
    assert server.stats()["allocations"] == 0
    client.close()


async def test_wrong_password_is_401_and_creates_nothing(server: TurnServer) -> None:
    client = await connect(server, "udp")
    await client.login(USER, "not the password")
    answer = await client.allocate()
    assert answer.error_code == 401
    assert "NONCE" in answer.attributes and "MESSAGE-INTEGRITY" not in answer.attributes
    assert server.stats()["allocations"] == 0


async def test_stale_nonce_is_438_with_a_fresh_one(server: TurnServer) -> None:
    client = await connect(server, "udp")
    await client.login(USER, PASSWORD)
    client.nonce = server.core.nonces.issue("127.0.0.1", time.time() - 3600)
    answer = await client.allocate()
    assert answer.error_code == 438
    fresh = answer.attributes["NONCE"]
    assert fresh != client.nonce and answer.attributes["REALM"] == "test.realm"
    client.nonce = fresh
    assert (await client.allocate()).message_class == Class.RESPONSE


async def test_rest_api_credentials(server: TurnServer) -> None:
    from turnkit import SECRET

    from p2pserver import credentials

    username, password = credentials.issue(SECRET, "peer-42", 60, time.time())
    client = await connect(server, "udp")
    await client.login(username, password)
    assert (await client.allocate()).message_class == Class.RESPONSE
    old, old_password = credentials.issue(SECRET, "peer-43", -10, time.time())
    late = await connect(server, "udp")
    await late.login(old, old_password)
    assert (await late.allocate()).error_code == 401


async def test_unknown_comprehension_required_attribute_is_420(server: TurnServer) -> None:
    client = await connect(server, "udp")
    message = Message(Method.BINDING, Class.REQUEST)
    raw = bytes(message) + struct.pack("!HH", 0x7ABC, 4) + b"abcd"
    raw = raw[:2] + struct.pack("!H", len(raw) - 20) + raw[4:]
    answer = await client.transact_raw(raw, message.transaction_id)
    assert answer.error_code == 420
    assert answer.attributes["UNKNOWN-ATTRIBUTES"] == [0x7ABC]


async def test_garbage_gets_no_answer_and_service_goes_on(server: TurnServer) -> None:
    client = await connect(server, "udp")
    for junk in (b"\xff" * 40, b"\x00\x01\x00\x00" + b"\x00" * 16, b"\x40\x00\xff\xff"):
        client.send_raw(junk)
    answer = await client.request(Method.BINDING, sign=False)
    assert answer.message_class == Class.RESPONSE
    assert await client.nothing_within(0.3)


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32),
        b"\x00\x01\x00\x00" + bytes(16),
    ],
)
async def test_tcp_garbage_closes_only_that_connection(server: TurnServer, garbage: bytes) -> None:
    good, _ = await allocated(server, "tcp")
    bad = await connect(server, "tcp")
    bad.send_raw(garbage)
    await asyncio.wait_for(bad.protocol.closed.wait(), 5)  # type: ignore[union-attr]
    answer = await good.request(Method.BINDING, sign=False)
    assert answer.message_class == Class.RESPONSE
    assert server.stats()["allocations"] == 1


async def test_tcp_close_deletes_the_allocation(server: TurnServer) -> None:
    client, _ = await allocated(server, "tcp")
    assert server.stats()["allocations"] == 1
    client.close()
    for _ in range(100):
        if server.stats()["allocations"] == 0:
            break
        await asyncio.sleep(0.05)
    assert server.stats()["allocations"] == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_send_and_data_indications(
    open_server: TurnServer, peer: Peer, transport: str
) -> None:
    client, relayed = await allocated(open_server, transport)
    send = Message(
        Method.SEND, Class.INDICATION, None, {"XOR-PEER-ADDRESS": peer.address, "DATA": b"early"}
    )
    client.send_raw(bytes(send))  # no permission yet: dropped
    answer = await client.request(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": peer.address})
    assert answer.message_class == Class.RESPONSE
    send = Message(
        Method.SEND, Class.INDICATION, None, {"XOR-PEER-ADDRESS": peer.address, "DATA": b"hello"}
    )
    client.send_raw(bytes(send))
    data, source = await asyncio.wait_for(peer.received.get(), 5)
    assert (data, source) == (b"hello", relayed)  # "early" never arrived
    assert peer.transport is not None
    peer.transport.sendto(b"back", relayed)
    indication = parse_message(await client.receive())
    assert indication.message_method == Method.DATA
    assert indication.attributes["DATA"] == b"back"
    assert indication.attributes["XOR-PEER-ADDRESS"] == peer.address


async def test_tcp_client_that_stops_reading_loses_only_its_own_data(
    open_server: TurnServer, peer: Peer
) -> None:
    """Relayed data for a TCP client that does not read is dropped past TCP_MAX_BUFFERED and
    counted (client_write_drops); its allocation and everyone else go on."""
    slow, relayed = await allocated(open_server, "tcp")
    answer = await slow.request(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": peer.address})
    assert answer.message_class == Class.RESPONSE
    slow.transport.pause_reading()  # type: ignore[attr-defined]
    assert peer.transport is not None
    payload = bytes(1200)
    # Bounded: at most 40,000 datagrams (48 MB), well past the kernel's buffers and the 1 MiB
    # the server holds for one client.
    for i in range(40_000):
        peer.transport.sendto(payload, relayed)
        if i % 200 == 199:
            await asyncio.sleep(0.002)  # let the server relay what it read
            if open_server.stats()["client_write_drops"]:
                break
    assert open_server.stats()["client_write_drops"] > 0
    other = await connect(open_server, "udp")
    assert (await other.request(Method.BINDING, sign=False)).message_class == Class.RESPONSE
    assert open_server.stats()["allocations"] == 1  # the slow client keeps its allocation
    slow.close()
    other.close()


# 0x7FFF: the top of RFC 5766's range, which old clients still use (datapath.is_channel); its
# first byte 0x7F must reach the channel path on UDP and through the TCP framer.
@pytest.mark.parametrize("channel", [0x4321, 0x7FFF])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_channel_data_both_ways(
    open_server: TurnServer, peer: Peer, transport: str, channel: int
) -> None:
    client, relayed = await allocated(open_server, transport)
    bind = {"CHANNEL-NUMBER": channel, "XOR-PEER-ADDRESS": peer.address}
    assert (await client.request(Method.CHANNEL_BIND, bind)).message_class == Class.RESPONSE
    for size in (1, 3, 100, 1201):
        payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
        client.send_channel_data(channel, payload)
        assert await asyncio.wait_for(peer.received.get(), 5) == (payload, relayed)
        assert peer.transport is not None
        peer.transport.sendto(payload[::-1], relayed)
        raw = await client.receive()
        number, length = struct.unpack("!HH", raw[:4])
        assert number == channel and raw[4 : 4 + length] == payload[::-1]
        if transport == "tcp":
            assert len(raw) % 4 == 0  # padded on streams (RFC 8656 §12.5)
    sent = sum((1, 3, 100, 1201))
    stats = open_server.stats()
    assert stats["peer_sentb"] == stats["peer_rcvb"] == sent
    assert stats["peer_sentp"] == stats["peer_rcvp"] == 4


async def test_counters_do_not_go_down_when_an_allocation_ends(
    open_server: TurnServer, peer: Peer
) -> None:
    client, relayed = await allocated(open_server, "udp")
    bind = {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": peer.address}
    assert (await client.request(Method.CHANNEL_BIND, bind)).message_class == Class.RESPONSE
    client.send_channel_data(0x4000, b"12345")
    assert await asyncio.wait_for(peer.received.get(), 5) == (b"12345", relayed)
    assert peer.transport is not None
    peer.transport.sendto(b"abc", relayed)
    await client.receive()
    before = open_server.stats()
    assert before["allocations"] == 1 and before["allocations_created"] == 1
    assert (before["peer_sentb"], before["peer_rcvb"]) == (5, 3)
    delete = await client.request(Method.REFRESH, {"LIFETIME": 0})
    assert delete.message_class == Class.RESPONSE
    after = open_server.stats()
    assert after["allocations"] == 0  # the gauge follows what is alive
    counters = [k for k in after if k not in GAUGES]
    assert all(after[k] >= before.get(k, 0) for k in counters), (before, after)
    assert (after["peer_sentb"], after["peer_rcvb"]) == (5, 3)
    assert (after["peer_sentp"], after["peer_rcvp"], after["allocations_created"]) == (1, 1, 1)


async def test_peer_without_permission_is_not_relayed(open_server: TurnServer, peer: Peer) -> None:
    client, relayed = await allocated(open_server, "udp")
    assert peer.transport is not None
    peer.transport.sendto(b"unsolicited", relayed)
    client.send_channel_data(0x4000, b"unbound channel")
    assert await client.nothing_within(0.5)
    assert peer.received.empty()


async def test_loopback_and_private_peers_get_403(server: TurnServer, peer: Peer) -> None:
    client, _ = await allocated(server, "udp")
    for address in (peer.address, ("10.0.0.1", 80), ("169.254.169.254", 80)):
        answer = await client.request(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": address})
        assert answer.error_code == 403, address
        bind = {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": address}
        assert (await client.request(Method.CHANNEL_BIND, bind)).error_code == 403
    mapped = await client.request(
        Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": ("::ffff:127.0.0.1", 80)}
    )
    assert mapped.error_code == 443  # the family is checked first: an IPv4 relay


async def test_another_allocations_relayed_address_is_reachable(
    make_server: ServerFactory,
) -> None:
    # The relayed address shown is a documentation address (nothing is sent to it): it is the
    # server's own, so a permission for it succeeds although the range is denied otherwise.
    server = await make_server(external_ip="198.51.100.7")
    relayed_a, b = await two_allocations(server)
    assert relayed_a[0] == "198.51.100.7"
    own = await b.request(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": relayed_a})
    assert own.message_class == Class.RESPONSE
    bind = {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": relayed_a}
    assert (await b.request(Method.CHANNEL_BIND, bind)).message_class == Class.RESPONSE
    listener = {"CHANNEL-NUMBER": 0x4001, "XOR-PEER-ADDRESS": ("198.51.100.7", server.port)}
    assert (await b.request(Method.CHANNEL_BIND, listener)).error_code == 403
    other = await b.request(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": ("198.51.100.8", 1)})
    assert other.error_code == 403


async def test_retransmitted_request_gets_the_same_answer(server: TurnServer) -> None:
    client = await connect(server, "udp")
    await client.login(USER, PASSWORD)
    request = Message(Method.ALLOCATE, Class.REQUEST, None, {"REQUESTED-TRANSPORT": 0x11000000})
    request.attributes.update({"USERNAME": USER, "REALM": client.realm, "NONCE": client.nonce})
    request.add_message_integrity(client.key or b"")
    first = await client.transact_raw(bytes(request), request.transaction_id)
    again = await client.transact_raw(bytes(request), request.transaction_id)
    assert first.message_class == again.message_class == Class.RESPONSE
    assert first.raw == again.raw  # type: ignore[attr-defined]
    fresh = await client.allocate()
    assert fresh.error_code == 437  # a new transaction on the same 5-tuple


async def test_ipv6_relay(make_server: ServerFactory) -> None:
    """RFC 6156: a relay on an IPv6 address, asked for with REQUESTED-ADDRESS-FAMILY."""
    import ipaddress

    server = await make_server(turn_host="::1", allow_peers=(ipaddress.ip_network("::1/128"),))
    loop = asyncio.get_running_loop()
    _, peer = await loop.create_datagram_endpoint(Peer, local_addr=("::1", 0))
    try:
        client = await StunClient.connect(("::1", server.port), "udp")
        await client.login(USER, PASSWORD)
        assert (await client.allocate()).error_code == 440  # IPv4 is the default family
        answer = await client.allocate(requested_address_family=2)
        assert answer.message_class == Class.RESPONSE, answer
        relayed = answer.attributes["XOR-RELAYED-ADDRESS"]
        assert relayed[0] == "::1"
        v4 = await client.request(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": ("8.8.8.8", 1)})
        assert v4.error_code == 443
        bind = {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": peer.address}
        assert (await client.request(Method.CHANNEL_BIND, bind)).message_class == Class.RESPONSE
        client.send_channel_data(0x4000, b"six")
        data, source = await asyncio.wait_for(peer.received.get(), 5)
        assert (data, source[:2]) == (b"six", relayed)
        assert peer.transport is not None
        peer.transport.sendto(b"back", relayed)
        raw = await client.receive()
        assert raw[:2] == b"\x40\x00" and raw[4:8] == b"back"
    finally:
        assert peer.transport is not None
        peer.transport.close()


async def test_dont_fragment_sets_df_on_the_relay_socket(server: TurnServer) -> None:
    import socket

    client = await connect(server, "udp")
    await client.login(USER, PASSWORD)
    answer = await client.allocate(dont_fragment=None)
    assert answer.message_class == Class.RESPONSE
    (allocation,) = list(server.core.table)
    sock = allocation.relays[1].sock  # type: ignore[attr-defined]
    if hasattr(socket, "IP_MTU_DISCOVER"):  # Linux
        value = sock.getsockopt(socket.IPPROTO_IP, socket.IP_MTU_DISCOVER)
        assert value == socket.IP_PMTUDISC_DO


async def test_relay_to_relay_on_a_wildcard_server_with_a_private_address(
    make_server: ServerFactory,
) -> None:
    # Bound to 0.0.0.0 with no --external-ip, the relayed address is the host's own address,
    # which may be private (a LAN server): other allocations must still reach it.
    server = await make_server(turn_host="0.0.0.0")
    relayed_a, b = await two_allocations(server)
    assert relayed_a[0] != "0.0.0.0"
    answer = await b.request(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": relayed_a})
    if relayed_a[0].startswith("127."):
        assert answer.error_code == 403  # a host with no other address: loopback stays denied
    else:
        assert answer.message_class == Class.RESPONSE
    other = await b.request(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": ("10.255.0.1", 1)})
    assert other.error_code == 403


async def test_unused_reservation_expires_and_frees_its_port(server: TurnServer) -> None:
    client = await connect(server, "udp")
    await client.login(USER, PASSWORD)
    answer = await client.allocate(even_port=True)
    token = answer.attributes["RESERVATION-TOKEN"]
    (sock, _) = server.relays.reservations[token]
    server.core.handle_timers(time.monotonic() + 31)  # RFC 8656 §7.2: held about 30 s
    assert token not in server.relays.reservations
    assert sock.fileno() == -1  # the port is free again
    late = await connect(server, "udp")
    await late.login(USER, PASSWORD)
    assert (await late.allocate(reservation_token=token)).error_code == 508


async def test_the_loop_runs_the_timers_when_due_whatever_the_wall_clock(
    server: TurnServer,
) -> None:
    """The asyncio layer arms a timer at the core's next deadline: a reservation made to run
    out in 0.2 s is closed by the loop itself, with the wall clock a day ahead meanwhile, and
    the allocation (600 s, monotonic) stays."""
    server.wall_clock = lambda: time.time() + 86400  # NTP stepped the clock a day forward
    server.relays.clock = lambda: time.monotonic() - RESERVATION_LIFETIME + 0.2
    client = await connect(server, "udp")
    await client.login(USER, PASSWORD)
    token = (await client.allocate(even_port=True)).attributes["RESERVATION-TOKEN"]
    (sock, _) = server.relays.reservations[token]
    deadline = time.monotonic() + 10
    while token in server.relays.reservations and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert token not in server.relays.reservations and sock.fileno() == -1
    assert len(server.core.table) == 1
    assert (await client.request(Method.REFRESH)).attributes["LIFETIME"] == 600


async def test_tcp_connection_that_never_allocates_is_closed_when_idle(
    server: TurnServer,
) -> None:
    from p2pserver.turn.server import TCP_IDLE_TIMEOUT

    idle = await connect(server, "tcp")
    busy, _ = await allocated(server, "tcp")
    assert (await idle.request(Method.BINDING, sign=False)).message_class == Class.RESPONSE
    later = time.monotonic() + TCP_IDLE_TIMEOUT + 1
    idle_conns = [c for c in server.connections if c.idle(later)]
    assert len(idle_conns) == 1  # the one without an allocation
    for connection in list(server.connections):
        connection.check_idle(later)  # what each connection's idle timer does then
    await asyncio.wait_for(idle.protocol.closed.wait(), 5)  # type: ignore[union-attr]
    assert (await busy.request(Method.REFRESH)).message_class == Class.RESPONSE


def all_attributes(raw: bytes, atype: int) -> list[bytes]:
    """Every value of attribute `atype` in a STUN message, repeats included."""
    values, pos = [], 20
    while pos + 4 <= len(raw):
        kind, length = struct.unpack_from("!HH", raw, pos)
        if kind == atype:
            values.append(raw[pos + 4 : pos + 4 + length])
        pos += 4 + length + (-length & 3)
    return values


async def test_dual_stack_allocation_relays_to_ipv4_and_ipv6_peers(
    make_server: ServerFactory,
) -> None:
    """RFC 8656 §7.2: ADDITIONAL-ADDRESS-FAMILY gets one allocation with two relayed addresses;
    permissions, channels and the peer policy work per family."""
    import ipaddress

    allow = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    server = await make_server(relay_ips=("127.0.0.1", "::1"), allow_peers=allow)
    loop = asyncio.get_running_loop()
    _, peer4 = await loop.create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    _, peer6 = await loop.create_datagram_endpoint(Peer, local_addr=("::1", 0))
    try:
        client = await connect(server, "udp")
        await client.login(USER, PASSWORD)
        answer = await client.allocate(additional_address_family=2)
        assert answer.message_class == Class.RESPONSE, answer
        assert "ADDRESS-ERROR-CODE" not in answer.attributes
        raw = answer.raw  # type: ignore[attr-defined]
        relayed = [
            aiostun.unpack_xor_address(value, raw[8:20]) for value in all_attributes(raw, 0x0016)
        ]
        assert [ip for ip, _ in relayed] == ["127.0.0.1", "::1"], relayed
        assert server.stats()["allocations"] == 1  # one allocation, two relayed addresses
        relay4, relay6 = relayed

        # The peer policy for both families: private and link-local peers stay refused.
        for denied in (("10.0.0.1", 9), ("fe80::1", 9)):
            refused = await client.request(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": denied})
            assert refused.error_code == 403, denied
        for number, peer in ((0x4000, peer4), (0x4001, peer6)):
            bind = {"CHANNEL-NUMBER": number, "XOR-PEER-ADDRESS": peer.address}
            bound = await client.request(Method.CHANNEL_BIND, bind)
            assert bound.message_class == Class.RESPONSE, bound

        for number, peer, relay in ((0x4000, peer4, relay4), (0x4001, peer6, relay6)):
            payload = f"to {relay[0]}".encode()
            client.send_channel_data(number, payload)
            data, source = await asyncio.wait_for(peer.received.get(), 5)
            assert (data, source[:2]) == (payload, relay)  # out of that family's relay
            assert peer.transport is not None
            peer.transport.sendto(payload[::-1], relay)
            back = await client.receive()
            assert struct.unpack("!H", back[:2])[0] == number and back[4:] == payload[::-1]

        # A Send indication picks the relay of its peer's family too.
        send = Message(
            Method.SEND, Class.INDICATION, None, {"XOR-PEER-ADDRESS": peer6.address, "DATA": b"6"}
        )
        client.send_raw(bytes(send))
        assert await asyncio.wait_for(peer6.received.get(), 5) == (b"6", (*relay6, 0, 0))
        stats = server.stats()
        assert (stats["peer_sentp"], stats["peer_rcvp"]) == (3, 2)
        delete = await client.request(Method.REFRESH, {"LIFETIME": 0})
        assert delete.message_class == Class.RESPONSE
        assert server.stats()["allocations"] == 0

        # REQUESTED-ADDRESS-FAMILY picks one family of the two.
        six = await connect(server, "udp")
        await six.login(USER, PASSWORD)
        only6 = await six.allocate(requested_address_family=2)
        assert only6.attributes["XOR-RELAYED-ADDRESS"][0] == "::1", only6
        v4 = {"XOR-PEER-ADDRESS": peer4.address}
        assert (await six.request(Method.CREATE_PERMISSION, v4)).error_code == 443
    finally:
        for peer in (peer4, peer6):
            assert peer.transport is not None
            peer.transport.close()
