"""Long-term credentials, REST API credentials and stateless nonces, without sockets."""

from __future__ import annotations

import hashlib

from p2pserver import credentials
from p2pserver.turn.auth import Credentials, Nonces, NonceStatus, long_term_key

NOW = 1_800_000_000.0


def test_long_term_key_is_md5_of_user_realm_password() -> None:
    assert long_term_key("u", "r", "p") == hashlib.md5(b"u:r:p").digest()


def test_nonce_round_trip_and_binding_to_the_client_address() -> None:
    nonces = Nonces(key=b"k" * 32)
    nonce = nonces.issue("192.0.2.1", NOW)
    assert len(nonce) == 32 and nonce.isalnum()
    assert nonces.check(nonce, "192.0.2.1", NOW + 1) is NonceStatus.VALID
    assert nonces.check(nonce, "192.0.2.2", NOW + 1) is NonceStatus.INVALID
    assert Nonces(key=b"x" * 32).check(nonce, "192.0.2.1", NOW) is NonceStatus.INVALID


def test_nonce_goes_stale_after_its_lifetime() -> None:
    nonces = Nonces(lifetime=600)
    nonce = nonces.issue("192.0.2.1", NOW)
    assert nonces.check(nonce, "192.0.2.1", NOW + 600) is NonceStatus.VALID
    assert nonces.check(nonce, "192.0.2.1", NOW + 601) is NonceStatus.STALE


def test_forged_or_garbled_nonces_are_invalid() -> None:
    nonces = Nonces()
    nonce = nonces.issue("192.0.2.1", NOW)
    later = b"%08x" % (int(NOW) + 5000) + nonce[8:]  # a newer time under the old MAC
    for bad in (b"", b"x" * 32, later, nonce[:-1], nonce + b"0", b"zzzzzzzz" + nonce[8:]):
        assert nonces.check(bad, "192.0.2.1", NOW) is NonceStatus.INVALID


def test_static_user_keys() -> None:
    creds = Credentials("realm", {"alice": "pw"})
    assert creds.key("alice", NOW) == long_term_key("alice", "realm", "pw")
    assert creds.key("mallory", NOW) is None
    assert creds.key(f"{int(NOW) + 60}:alice", NOW) is None  # no secret: no REST users


def test_rest_api_credentials_verify_until_they_expire() -> None:
    creds = Credentials("realm", {}, secret="s3")
    username, password = credentials.issue("s3", "peer-1", 3600, NOW)
    assert username == f"{int(NOW) + 3600}:peer-1"
    assert creds.key(username, NOW) == long_term_key(username, "realm", password)
    assert creds.key(username, NOW + 3600) is not None
    assert creds.key(username, NOW + 3601) is None  # expired
    assert creds.key("peer-1", NOW) is None  # not of the REST form
    assert creds.key("\uff11\uff12\uff13:x", NOW) is None  # non-ASCII digits are not a time


def test_rest_password_is_base64_hmac_sha1() -> None:
    # The value coturn computes for secret "north", username "1700000000:user".
    import base64
    import hmac

    expected = base64.b64encode(
        hmac.new(b"north", b"1700000000:user", hashlib.sha1).digest()
    ).decode()
    assert credentials.rest_password("north", "1700000000:user") == expected
    assert credentials.rest_expiry("1700000000:user") == 1700000000
    assert credentials.rest_expiry("1700000000") == 1700000000
    assert credentials.rest_expiry("user:1700000000") is None
