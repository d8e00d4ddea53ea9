"""Which peers a relay may talk to: the defence against open-relay and SSRF abuse.

Coturn CVE-2020-26262 and CVE-2026-27624 let TURN clients reach loopback, cloud metadata and
internal services through encodings that hide an IPv4 address inside IPv6. So every address is
first canonicalised to the IPv4 address it really reaches, then checked.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# What no public peer can be (docs/turn.md, "Peer policy").
DEFAULT_DENY: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "100::/64",
        "2001:db8::/32",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    )
)

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIXTOFOUR = ipaddress.ip_network("2002::/16")
_TEREDO = ipaddress.ip_network("2001::/32")
_COMPAT = ipaddress.ip_network("::/96")


def canonical(address: str | IPAddress) -> IPAddress:
    """The address a packet to `address` really reaches (RFC 4291 §2.5.5, RFC 6052, RFC 3056,
    RFC 4380): IPv4-mapped, IPv4-compatible, NAT64, 6to4 and Teredo all unwrap to IPv4."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _SIXTOFOUR:
        return ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF)
    if ip in _TEREDO:
        return ipaddress.IPv4Address(~int(ip) & 0xFFFFFFFF)  # client address, obfuscated
    if ip in _COMPAT and int(ip) > 1:  # ::/128 and ::1 stay as they are (both denied)
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


class PeerPolicy:
    """Decides whether a relay may send to or receive from a peer (ip, port)."""

    def __init__(
        self,
        allow: Iterable[IPNetwork] = (),
        deny: Iterable[IPNetwork] = (),
        own_addresses: Iterable[str] = (),
        relay_ports: tuple[int, int] = (49152, 65535),
        listen_ports: Iterable[int] = (),
    ) -> None:
        self.allow = tuple(allow)
        self.deny = tuple(deny)  # added to DEFAULT_DENY, and beats --allow-peer
        self.relay_ports = relay_ports
        self.listen_ports = frozenset(listen_ports)
        # The server's own relay addresses: reachable on relay ports, never on any other port.
        self.own = {ip for ip in map(canonical, own_addresses) if not ip.is_unspecified}
        # Every relayed datagram asks; the answers only change through the methods below.
        self._caches = (
            lru_cache(maxsize=8192)(self._permits),
            lru_cache(maxsize=8192)(self._permits_ip),
        )
        self.permits, self.permits_ip = self._caches

    def add_own(self, address: str) -> None:
        """Count `address` as one of this server's relay addresses (the relayed address it
        hands out, learnt at the first allocation when the relay binds to a wildcard)."""
        ip = canonical(address)
        if not ip.is_unspecified and ip not in self.own:
            self.own.add(ip)
            self._forget()

    def listen_on(self, ports: Iterable[int]) -> None:
        """The ports the server's listeners got (port 0 is only known after binding)."""
        self.listen_ports = frozenset(ports)
        self._forget()

    def _forget(self) -> None:
        for cache in self._caches:
            cache.cache_clear()

    def _permits_ip(self, address: str) -> bool:
        """CreatePermission installs an IP without a port (RFC 8656 §9)."""
        try:
            ip = canonical(address)
        except ValueError:
            return False
        if ip in self.own and not ip.is_loopback:
            return True
        return self._open(ip)

    def _permits(self, address: str, port: int) -> bool:
        """Send, ChannelBind and inbound relay data carry a port as well."""
        try:
            ip = canonical(address)
        except ValueError:
            return False
        own = ip in self.own and not ip.is_loopback
        if port in self.listen_ports and (own or ip.is_loopback or self._allowed(ip)):
            return False  # never relay into this server's own listeners (a loop)
        if own:
            return self.relay_ports[0] <= port <= self.relay_ports[1]
        return port != 0 and self._open(ip)

    def _open(self, ip: IPAddress) -> bool:
        if _within(ip, self.deny):
            return False  # an operator's --deny-peer beats --allow-peer
        return self._allowed(ip) or not _within(ip, DEFAULT_DENY)

    def _allowed(self, ip: IPAddress) -> bool:
        return _within(ip, self.allow)


def _within(ip: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    return any(ip in net for net in networks if net.version == ip.version)
