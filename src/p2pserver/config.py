"""One immutable Settings object, built from command-line flags and P2P_* environment variables."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
SYNC_MODES = ("normal", "full")  # --db-sync (docs/api.md#rooms)


class StartupError(Exception):
    """What keeps the server from starting, said in one line (a port in use, a certificate that
    does not load, a database that does not open): the CLI prints it and exits 1."""


@dataclass(frozen=True)
class Settings:
    # HTTP side (rooms, signaling)
    http: bool = True
    http_host: str = "0.0.0.0"
    http_port: int = 3000
    db: str = "p2pserver.db"
    db_sync: str = "normal"  # SQLite's synchronous setting: normal or full (docs/api.md, rooms)
    redis: str | None = None  # redis:// URL: the store a fleet of instances shares (docs/deploy.md)
    redis_presence_ttl: float = 10.0  # a dead instance's peers are reported left within 1.5x this
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
    resume_window: float = 30.0  # a dropped peer keeps its place this long (docs/api.md, resume)
    ws_compression: bool = False  # permessage-deflate (RFC 7692), small windows when on
    pin_attempts: int = 5
    pin_lockout: float = 300.0
    health_file: str | None = None  # where to write the /healthz URL once listening

    # STUN/TURN side
    turn: bool = True
    turn_host: str = "0.0.0.0"
    turn_port: int = 3478
    tls_port: int = 5349
    tls_cert: str | None = None
    tls_key: str | None = None
    relay_ips: tuple[str, ...] = ()  # at most one per address family
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
    # Worker processes for STUN/TURN (docs/turn.md, "Workers"): 1 serves in this process. The
    # CLI's default is the CPUs this process may use; embedded servers and tests start with 1.
    turn_workers: int = 1
    # The relay self-test at start-up (selftest.py). The CLI turns it on (--no-self-test turns it
    # off); servers embedded in other programs and tests start without it.
    self_test: bool = False

    # Who may read GET /metrics (docs/operations.md): loopback unless --metrics-allow says more.
    metrics_allow: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )

    log_level: str = "info"
    log_format: str = "text"  # or "json": one object per line (docs/operations.md)
    ready_file: str | None = None  # where the bound ports are written once all listen

    @property
    def relay_bind_ips(self) -> dict[int, str]:
        """Where relay sockets bind, by STUN address family (1 = IPv4, 2 = IPv6): each
        --relay-ip, else the TURN listen address. Two families make dual-stack allocations
        possible (RFC 8656 §7.2)."""
        return {2 if ":" in ip else 1: ip for ip in self.relay_ips or (self.turn_host,)}
