"""The iceServers list handed to each peer: STUN and TURN URLs with REST API credentials."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from p2pserver import credentials
from p2pserver.config import Settings

_HOSTNAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?")


def url_host(host: str) -> str | None:
    """`host` as it goes into a URL (IPv6 in brackets), or None if it is no host name or IP."""
    host = host.strip().lower()
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        return host if bare == host and _HOSTNAME_RE.fullmatch(host) else None
    return f"[{ip}]" if ip.version == 6 else str(ip)


def host_from_header(value: str) -> str | None:
    """The host part of a Host header ("example.org:3000", "[::1]:3000"), URL-ready, or None."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        return url_host(value[: end + 1]) if end > 0 else None
    if value.count(":") > 1:  # a bare IPv6 address, which a Host header should not carry
        return url_host(value)
    return url_host(value.partition(":")[0])


def ice_servers(
    settings: Settings, host: str, secret: str, peer_id: str, now: float
) -> list[dict[str, Any]]:
    """RTCIceServer dictionaries for a browser: STUN, then TURN over UDP and TCP (and TLS)."""
    username, password = credentials.issue(secret, peer_id, settings.ice_ttl, now)
    port = settings.turn_port
    turn_urls = [f"turn:{host}:{port}?transport=udp", f"turn:{host}:{port}?transport=tcp"]
    if settings.tls_cert:
        turn_urls.append(f"turns:{host}:{settings.tls_port}?transport=tcp")
    return [
        {"urls": [f"stun:{host}:{port}"]},
        {"urls": turn_urls, "username": username, "credential": password},
    ]
