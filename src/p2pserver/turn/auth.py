"""Long-term credentials (RFC 8489 §9.2), stateless nonces, static users and REST API users.

Nothing here keeps per-client state: a nonce is an HMAC of its issue time and the client's IP,
so a flood of unauthenticated requests costs the server no memory.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from functools import lru_cache

from p2pserver.credentials import rest_expiry, rest_password

NONCE_LIFETIME = 600.0  # then 438 with a fresh NONCE (docs/turn.md, Defaults and Credentials)


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """RFC 8489 §9.2.2: key = MD5(username ":" OpaqueString(realm) ":" OpaqueString(password))."""
    return hashlib.md5(f"{username}:{realm}:{password}".encode()).digest()


class NonceStatus(enum.Enum):
    VALID = "valid"
    STALE = "stale"
    INVALID = "invalid"


class Nonces:
    """Stateless nonces: 8 hex digits of issue time, then 24 of HMAC-SHA256(time, client IP)."""

    def __init__(self, key: bytes | None = None, lifetime: float = NONCE_LIFETIME) -> None:
        self._key = key or os.urandom(32)
        self.lifetime = lifetime
        # A nonce changes once a second per client IP; its MAC is asked for on every request
        # (issued with each 401/438, checked on each signed request): remember recent ones.
        self._mac = lru_cache(maxsize=4096)(self._compute_mac)

    def _compute_mac(self, stamp: bytes, client_ip: str) -> bytes:
        digest = hmac.new(self._key, stamp + client_ip.encode(), hashlib.sha256).hexdigest()
        return digest[:24].encode()

    def issue(self, client_ip: str, now: float) -> bytes:
        stamp = b"%08x" % (int(now) & 0xFFFFFFFF)
        return stamp + self._mac(stamp, client_ip)

    def check(self, nonce: bytes, client_ip: str, now: float) -> NonceStatus:
        if len(nonce) != 32:
            return NonceStatus.INVALID
        stamp = nonce[:8]
        if not hmac.compare_digest(nonce[8:], self._mac(stamp, client_ip)):
            return NonceStatus.INVALID
        try:
            issued = struct.unpack("!I", bytes.fromhex(stamp.decode()))[0]
        except ValueError:
            return NonceStatus.INVALID
        age = (int(now) - issued) & 0xFFFFFFFF
        return NonceStatus.VALID if age <= self.lifetime else NonceStatus.STALE


@dataclass(frozen=True)
class Credentials:
    """Who may use the relay: static users and, with a secret, TURN REST API users."""

    realm: str
    users: dict[str, str]
    secret: str | None = None

    def key(self, username: str, now: float) -> bytes | None:
        """The long-term key for `username`, or None if no such user or the credential expired.

        A static user wins over a REST API name of the same form, so an operator's user never
        depends on the secret."""
        password = self.users.get(username)
        if password is not None:
            return _key(username, self.realm, password)
        if self.secret is None:
            return None
        expiry = rest_expiry(username)
        if expiry is None or expiry < now:
            return None
        return _key(username, self.realm, rest_password(self.secret, username))


@lru_cache(maxsize=4096)
def _key(username: str, realm: str, password: str) -> bytes:
    return long_term_key(username, realm, password)
