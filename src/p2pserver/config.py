"""One immutable Settings object, built from command-line flags and P2P_* environment variables."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Settings:
    # HTTP side (rooms, signaling)
    http: bool = True
    http_host: str = "0.0.0.0"
    http_port: int = 3000
    db: str = "p2pserver.db"
    public_host: str | None = None
    cors_origins: tuple[str, ...] = ("*",)
    room_ttl: float = 24 * 3600.0
    ice_ttl: int = 3600
    room_peers: int = 2
    max_room_peers: int = 8
    rooms_per_minute: int = 30
    ws_max_message: int = 64 * 1024
    ws_messages_per_second: float = 50.0
    ws_connections_per_ip: int = 32
    ws_join_timeout: float = 10.0
    ws_max_errors: int = 50
    ws_compression: bool = False  # permessage-deflate (RFC 7692), small windows when on
    pin_attempts: int = 5
    pin_lockout: float = 300.0

    # STUN/TURN side
    turn: bool = True
    turn_host: str = "0.0.0.0"
    turn_port: int = 3478
    tls_port: int = 5349
    tls_cert: str | None = None
    tls_key: str | None = None
    relay_ip: str | None = None
    external_ip: str | None = None
    relay_ports: tuple[int, int] = (49152, 65535)
    realm: str = "p2pserver"
    users: tuple[tuple[str, str], ...] = ()
    secret: str | None = None
    allow_peers: tuple[IPNetwork, ...] = ()
    deny_peers: tuple[IPNetwork, ...] = ()
    user_quota: int = 32
    max_allocations: int = 10000
    max_permissions: int = 128
    software: str = "p2pserver"

    log_level: str = "info"

    @property
    def turn_relay_ip(self) -> str:
        """Address relay sockets bind to: --relay-ip, else the TURN listen address."""
        return self.relay_ip or self.turn_host
