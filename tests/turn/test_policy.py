"""The peer policy, without sockets: every encoding that hides a forbidden IPv4 address."""

from __future__ import annotations

import ipaddress

import pytest

from p2pserver.turn.policy import PeerPolicy, canonical

BYPASSES = [
    "0.0.0.0",
    "::",
    "::1",
    "127.0.0.1",
    "127.1.2.3",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::127.0.0.1",  # IPv4-compatible
    "64:ff9b::7f00:1",  # NAT64
    "2002:7f00:1::",  # 6to4
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1 obfuscated
    "::ffff:169.254.169.254",  # cloud metadata, mapped
    "64:ff9b::a9fe:a9fe",  # cloud metadata, NAT64
    "::ffff:10.0.0.1",
    "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
]

DENIED = [
    "10.1.2.3",
    "100.64.0.1",
    "169.254.169.254",
    "172.16.0.1",
    "172.31.255.255",
    "192.0.0.8",
    "192.0.2.1",
    "192.168.1.1",
    "198.18.0.1",
    "198.51.100.1",
    "203.0.113.1",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "100::1",
    "2001:db8::1",
    "fc00::1",
    "fd12:3456::1",
    "fe80::1",
    "fec0::1",
    "ff02::1",
]

PUBLIC = ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", BYPASSES + DENIED)
def test_denied_by_default(address: str) -> None:
    policy = PeerPolicy()
    assert not policy.permits_ip(address)
    assert not policy.permits(address, 5000)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_peers_are_permitted(address: str) -> None:
    policy = PeerPolicy()
    assert policy.permits_ip(address)
    assert policy.permits(address, 5000)
    assert not policy.permits(address, 0)  # port 0 reaches nobody


def test_canonical_unwraps_to_the_ipv4_address_reached() -> None:
    expected = ipaddress.ip_address("127.0.0.1")
    for address in BYPASSES[5:10]:
        assert canonical(address) == expected, address
    assert canonical("2001:4860::8888") == ipaddress.ip_address("2001:4860::8888")


def test_allow_peer_opens_a_range_and_deny_peer_beats_it() -> None:
    lan = ipaddress.ip_network("192.168.0.0/16")
    policy = PeerPolicy(allow=[lan], deny=[ipaddress.ip_network("192.168.66.0/24")])
    assert policy.permits_ip("192.168.1.20")
    assert policy.permits_ip("::ffff:192.168.1.20")  # canonicalised before the allow list too
    assert not policy.permits_ip("192.168.66.1")
    assert not policy.permits_ip("10.0.0.1")
    assert not PeerPolicy(deny=[ipaddress.ip_network("8.8.8.0/24")]).permits_ip("8.8.8.8")


def test_own_relay_address_reachable_only_on_relay_ports() -> None:
    policy = PeerPolicy(own_addresses=["203.0.113.7", "0.0.0.0"], relay_ports=(50000, 50100))
    assert policy.permits_ip("203.0.113.7")  # a documentation address, but our own
    assert policy.permits("203.0.113.7", 50000)
    assert policy.permits("::ffff:203.0.113.7", 50100)
    assert not policy.permits("203.0.113.7", 3478)  # our listener, or anything else on the host
    assert not policy.permits("203.0.113.7", 50101)
    assert not policy.permits_ip("0.0.0.0")  # an unspecified bind address is not "own"


def test_own_loopback_address_gets_no_exemption() -> None:
    policy = PeerPolicy(own_addresses=["127.0.0.1"], relay_ports=(50000, 50100))
    assert not policy.permits_ip("127.0.0.1")
    assert not policy.permits("127.0.0.1", 50000)


def test_listening_ports_are_never_a_peer_even_when_allowed() -> None:
    policy = PeerPolicy(allow=[ipaddress.ip_network("127.0.0.0/8")], listen_ports={3478})
    assert policy.permits("127.0.0.1", 40000)
    assert not policy.permits("127.0.0.1", 3478)
    assert not policy.permits("::ffff:127.0.0.1", 3478)


def test_garbage_addresses_are_refused_not_raised() -> None:
    policy = PeerPolicy()
    assert not policy.permits_ip("not-an-ip")
    assert not policy.permits("fe80::1%eth0", 1)


def test_an_own_address_learnt_later_is_reachable_on_relay_ports() -> None:
    policy = PeerPolicy(relay_ports=(50000, 50100))
    assert not policy.permits("192.168.7.7", 50000)  # cached "no"...
    policy.add_own("192.168.7.7")
    assert policy.permits("192.168.7.7", 50000)  # ...forgotten once the address is ours
    assert policy.permits_ip("192.168.7.7")
    assert not policy.permits("192.168.7.7", 22)
