"""TURN REST API credentials: issued by the signaling, verified by the TURN server.

username = "<unix expiry>:<id>", password = base64(HMAC-SHA1(secret, username)); the scheme of
draft-uberti-behave-turn-rest, which coturn (use-auth-secret) and pion/turn implement too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac


def rest_password(secret: str, username: str) -> str:
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def issue(secret: str, user_id: str, ttl: int, now: float) -> tuple[str, str]:
    """Return (username, password) valid until now + ttl."""
    username = f"{int(now) + ttl}:{user_id}"
    return username, rest_password(secret, username)


def rest_expiry(username: str) -> int | None:
    """The expiry encoded in a REST API username, or None if it is not one."""
    head = username.partition(":")[0]
    return int(head) if head.isascii() and head.isdigit() and len(head) <= 12 else None
