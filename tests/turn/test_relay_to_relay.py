"""Relay to relay inside the server (docs/turn.md, "Relay to relay"): a datagram for another
allocation's relayed address is handed over without a socket, exactly as if it had gone out and
come back in: permissions on both sides, the peer policy, counters and order."""

from __future__ import annotations

import asyncio
import struct

import pytest
from aioice.stun import Class, Method
from stunclient import StunClient
from turnkit import LOOPBACK, PASSWORD, USER, ServerFactory

from p2pserver.turn.allocation import Address, Allocation
from p2pserver.turn.relay import RelaySocket
from p2pserver.turn.server import TurnServer
from p2pserver.turn.stun import TurnMessage as Message
from p2pserver.turn.stun import parse_message

EXTERNAL = "198.51.100.7"  # a documentation address: it must never be sent to


async def allocation(server: TurnServer) -> tuple[StunClient, Address, Allocation]:
    client = await StunClient.connect(("127.0.0.1", server.port), "udp")
    await client.login(USER, PASSWORD)
    answer = await client.allocate()
    assert answer.message_class == Class.RESPONSE, answer
    relayed = tuple(answer.attributes["XOR-RELAYED-ADDRESS"])
    found = server.core.table.local_relay(relayed)  # type: ignore[arg-type]
    assert found is not None
    return client, relayed, found  # type: ignore[return-value]


async def ok(client: StunClient, method: Method, attrs: dict[str, object]) -> None:
    assert (await client.request(method, attrs)).message_class == Class.RESPONSE


def send_indication(peer: Address, payload: bytes) -> bytes:
    message = Message(Method.SEND, Class.INDICATION)
    message.attributes["XOR-PEER-ADDRESS"] = peer
    message.attributes["DATA"] = payload
    return bytes(message)


async def received(client: StunClient) -> tuple[str, object, bytes]:
    """('channel', number, payload) or ('data', peer, payload) for the next relayed datagram."""
    raw = await client.receive()
    if 0x40 <= raw[0] <= 0x7F:
        number, length = struct.unpack_from("!HH", raw)
        return "channel", number, raw[4 : 4 + length]
    message = parse_message(raw)
    assert message.message_method == Method.DATA, message
    peer = tuple(message.attributes["XOR-PEER-ADDRESS"])
    return "data", peer, message.attributes["DATA"]


def counts(allocation: Allocation) -> tuple[int, int, int, int]:
    return allocation.peer_sentp, allocation.peer_sentb, allocation.peer_rcvp, allocation.peer_rcvb


@pytest.fixture
def relay_sends(monkeypatch: pytest.MonkeyPatch) -> list[Address]:
    """Every address a relay socket sends to, from now on."""
    sends: list[Address] = []
    original = RelaySocket.sendto

    def recording(self: RelaySocket, data: bytes, peer: Address) -> None:
        sends.append(peer)
        original(self, data, peer)

    monkeypatch.setattr(RelaySocket, "sendto", recording)
    return sends


async def conversation(
    a: StunClient, relayed_a: Address, b: StunClient, relayed_b: Address
) -> list[tuple[str, object, bytes]]:
    """A binds a channel to B's relayed address and B one to A's; A sends 20 ChannelData, B a
    ChannelData and a Send indication. Returns what each client got, B's first."""
    await ok(a, Method.CHANNEL_BIND, {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": relayed_b})
    await ok(b, Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": relayed_a})
    for i in range(20):
        a.send_channel_data(0x4000, b"a to b %d" % i)
    got = [await received(b) for _ in range(20)]
    await ok(b, Method.CHANNEL_BIND, {"CHANNEL-NUMBER": 0x4001, "XOR-PEER-ADDRESS": relayed_a})
    b.send_channel_data(0x4001, b"b to a on a channel")
    b.send_raw(send_indication(relayed_a, b"b to a in a Send indication"))
    return [*got, await received(a), await received(a)]


async def test_relay_to_relay_through_an_external_ip_that_does_not_hairpin(
    make_server: ServerFactory, relay_sends: list[Address]
) -> None:
    """Both relayed addresses are --external-ip, which this host cannot reach: the datagrams
    never go to it (no relay socket sends anything at all), and arrive in order, from the
    sender's relayed address as its client knows it."""
    server = await make_server(
        external_ip=EXTERNAL, relay_ips=("127.0.0.1",), allow_peers=(LOOPBACK,)
    )
    a, relayed_a, alloc_a = await allocation(server)
    b, relayed_b, alloc_b = await allocation(server)
    assert relayed_a[0] == relayed_b[0] == EXTERNAL
    got = await conversation(a, relayed_a, b, relayed_b)
    assert got[:20] == [("data", relayed_a, b"a to b %d" % i) for i in range(20)]  # in order
    assert got[20:] == [
        ("channel", 0x4000, b"b to a on a channel"),  # from B's relayed address: A's channel
        ("channel", 0x4000, b"b to a in a Send indication"),
    ]
    assert relay_sends == []  # nothing left a socket, so nothing went to 198.51.100.7
    sent_by_a = sum(len(b"a to b %d" % i) for i in range(20))
    sent_by_b = len(b"b to a on a channel") + len(b"b to a in a Send indication")
    assert counts(alloc_a) == (20, sent_by_a, 2, sent_by_b)
    assert counts(alloc_b) == (2, sent_by_b, 20, sent_by_a)
    stats = server.stats()
    assert stats["peer_sentp"] == stats["peer_rcvp"] == 22


async def test_a_permission_missing_on_either_side_stops_the_datagram(
    make_server: ServerFactory, relay_sends: list[Address]
) -> None:
    server = await make_server(
        external_ip=EXTERNAL, relay_ips=("127.0.0.1",), allow_peers=(LOOPBACK,)
    )
    a, relayed_a, alloc_a = await allocation(server)
    b, relayed_b, alloc_b = await allocation(server)
    await ok(a, Method.CHANNEL_BIND, {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": relayed_b})
    # The sender has no permission (B has none yet): never sent, though A would take it.
    b.send_raw(send_indication(relayed_a, b"b has no permission"))
    assert await a.nothing_within(0.3)
    assert counts(alloc_b) == (0, 0, 0, 0) and counts(alloc_a) == (0, 0, 0, 0)
    # The receiver has no permission for the sender: sent (and counted) by A, dropped at B,
    # as the socket would have had it.
    a.send_channel_data(0x4000, b"unasked")
    assert await b.nothing_within(0.3)
    assert counts(alloc_a) == (1, 7, 0, 0) and counts(alloc_b) == (0, 0, 0, 0)
    # A permission for the bind address is not one for the relayed address B's client knows.
    await ok(b, Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": ("127.0.0.1", 1)})
    a.send_channel_data(0x4000, b"still unasked")
    assert await b.nothing_within(0.3)
    await ok(b, Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": relayed_a})
    a.send_channel_data(0x4000, b"now b has a permission")
    assert await received(b) == ("data", relayed_a, b"now b has a permission")
    assert counts(alloc_b) == (0, 0, 1, 22)
    assert relay_sends == []


async def test_counters_and_deliveries_match_the_socket_path(
    make_server: ServerFactory, relay_sends: list[Address]
) -> None:
    """The same conversation twice on a loopback relay (which does hairpin): once handed over
    inside, once through the sockets (the inside table emptied). Same deliveries, same
    counters."""
    results = []
    for through_sockets in (False, True):
        server = await make_server(relay_ips=("127.0.0.1",), allow_peers=(LOOPBACK,))
        a, relayed_a, alloc_a = await allocation(server)
        b, relayed_b, alloc_b = await allocation(server)
        if through_sockets:
            server.core.table.inside.clear()
        relay_sends.clear()
        got = await conversation(a, relayed_a, b, relayed_b)
        assert len(relay_sends) == (22 if through_sockets else 0)
        # Peers as (which relay, payload): the ports differ between the two servers.
        shown = [(kind, peer == relayed_a or peer, data) for kind, peer, data in got]
        results.append((shown, counts(alloc_a), counts(alloc_b), server.stats()["peer_rcvb"]))
        a.close()
        b.close()
        await asyncio.sleep(0)
    assert results[0] == results[1]
