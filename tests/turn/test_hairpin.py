"""Relay to relay through --external-ip between two TURN workers (relay.Hairpin), on loopback.

Two TurnServers run as workers do (each its slice of the relay range, one reservation key), one
allocation on each, so the datagram must leave one worker's relay socket for the other's. The
relays bind 127.0.0.1 and are announced at 127.0.0.2, where nothing of the server listens: as
a NAT that does not hairpin, that address never brings a datagram back. A trap socket on
127.0.0.2 at each relayed port would catch anything the server sent to the announced address.
(Within one process the core hands the datagram over itself: tests/turn/test_relay_to_relay.py;
tests/turn/test_workers.py does this across real worker processes in a network namespace.)
"""

from __future__ import annotations

import socket

from aioice.stun import Method
from stunclient import StunClient
from turnkit import LOOPBACK, PASSWORD, USER, ServerFactory

EXTERNAL = "127.0.0.2"
RANGE = (49152, 65535)


async def test_relay_to_relay_goes_to_the_relays_real_address(make_server: ServerFactory) -> None:
    low, high = RANGE
    middle = (low + high) // 2
    servers = [
        await make_server(
            {"relay_ports": ports, "reservation_key": bytes(32)},
            allow_peers=(LOOPBACK,),
            external_ip=EXTERNAL,
            relay_ports=RANGE,
        )
        for ports in ((low, middle), (middle + 1, high))
    ]
    clients, relayed, traps = [], [], []
    try:
        for server in servers:
            client = await StunClient.connect(("127.0.0.1", server.port))
            await client.login(USER, PASSWORD)
            answer = await client.allocate()
            assert answer.error_code is None, answer
            address = answer.attributes["XOR-RELAYED-ADDRESS"]
            assert address[0] == EXTERNAL
            trap = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            trap.bind(address)  # free: the relay itself is bound to 127.0.0.1
            trap.setblocking(False)
            clients.append(client)
            relayed.append(address)
            traps.append(trap)
        a, b = clients
        for client, other in ((a, relayed[1]), (b, relayed[0])):
            bound = await client.request(
                Method.CHANNEL_BIND, {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": other}
            )
            assert bound.error_code is None, bound

        a.send_channel_data(0x4000, b"to b")
        assert await b.receive() == b"\x40\x00\x00\x04to b"  # from a's announced address
        b.send_channel_data(0x4000, b"to a")
        assert await a.receive() == b"\x40\x00\x00\x04to a"

        for trap in traps:
            try:
                data = trap.recv(2048)
            except BlockingIOError:
                continue
            raise AssertionError(f"the server sent {data!r} to its announced address")
        for server in servers:  # each worker sent one datagram out and took one in
            stats = server.stats()
            assert stats["peer_sentp"] == 1 and stats["peer_rcvp"] == 1, stats
            assert stats["peer_send_drops"] == 0, stats
    finally:
        for client in clients:
            client.close()
        for trap in traps:
            trap.close()
