"""STUN decoding and validation, without sockets: RFC 5769 vectors and every rejection rule."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from aioice import stun as aiostun
from aioice.stun import Class, Method

from p2pserver.config import Settings
from p2pserver.turn import stun
from p2pserver.turn.auth import Nonces, long_term_key
from p2pserver.turn.handlers import Client, TurnCore
from p2pserver.turn.policy import PeerPolicy
from p2pserver.turn.stun import TurnMessage as Message
from p2pserver.turn.stun import parse_message

# The RFC 5769 test vectors, kept in the repository so the suite runs wherever it is cloned.
VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parents[1] / "data" / "rfc5769-vectors.json").read_text()
)
TXID = bytes(range(12))


def vector(name: str) -> bytes:
    return bytes.fromhex(VECTORS[name]["hex"])


def build(method: int = Method.BINDING, cls: int = Class.REQUEST, attrs: bytes = b"") -> bytes:
    return struct.pack("!HHI12s", method | cls, len(attrs), stun.COOKIE, TXID) + attrs


def attr(atype: int, value: bytes) -> bytes:
    return struct.pack("!HH", atype, len(value)) + value + bytes(-len(value) & 3)


# --- RFC 5769 ---------------------------------------------------------------------------------


def test_rfc5769_short_term_request_decodes_and_verifies() -> None:
    v = VECTORS["short_term_request"]
    request = stun.decode(vector("short_term_request"))
    assert request.method == Method.BINDING and request.cls == Class.REQUEST
    assert request.attributes["USERNAME"] == v["username"]
    assert request.attributes["SOFTWARE"] == v["software"]
    assert "FINGERPRINT" in request.attributes  # decode() verified the CRC
    assert request.check_integrity(v["password"].encode())  # short-term key: the password
    assert not request.check_integrity(b"wrong")


@pytest.mark.parametrize("name", ["ipv4_response", "ipv6_response"])
def test_rfc5769_responses_verify_and_are_not_for_a_server(name: str) -> None:
    v = VECTORS[name]
    raw = vector(name)
    assert stun.header(raw) is not None
    message = parse_message(raw)
    assert message.attributes["XOR-MAPPED-ADDRESS"] == tuple(v["xor_mapped_address"])
    assert message.check_message_integrity(v["password"].encode())
    with pytest.raises(stun.Malformed):
        stun.decode(raw)  # a server drops responses


def test_rfc5769_long_term_request_verifies_with_md5_key() -> None:
    v = VECTORS["long_term_request"]
    request = stun.decode(vector("long_term_request"))
    assert request.attributes["USERNAME"] == v["username"]
    assert request.attributes["REALM"] == v["realm"]
    assert request.attributes["NONCE"] == v["nonce"].encode()
    key = long_term_key(v["username"], v["realm"], v["password"])
    assert request.check_integrity(key)
    assert not request.check_integrity(long_term_key(v["username"], v["realm"], "thematrix"))


def test_rfc5769_sha256_vector_decodes_and_verifies() -> None:
    """USERHASH + PASSWORD-ALGORITHM + MESSAGE-INTEGRITY-SHA256 (RFC 8489 §9.2.2, errata 6268)."""
    v = VECTORS["long_term_request_sha256"]
    raw = vector("long_term_request_sha256")
    request = stun.decode(raw)  # the SHA-256 attributes are known: no 420
    userhash = hashlib.sha256(f"{v['username']}:{v['realm']}".encode()).digest()
    assert request.attributes["USERHASH"] == userhash
    # MESSAGE-INTEGRITY-SHA256 covers the message up to it, length adjusted to end after it.
    pos = raw.index(struct.pack("!HH", 0x001C, 32))
    covered = raw[:2] + struct.pack("!H", pos + 36 - 20) + raw[4:pos]
    key = hashlib.sha256(f"{v['username']}:{v['realm']}:{v['password']}".encode()).digest()
    assert hmac.new(key, covered, hashlib.sha256).digest() == raw[pos + 4 : pos + 36]


# --- what gets dropped ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\x01\x00",
        build()[:19],
        b"\x80" + build()[1:],  # top bits set
        build()[:4] + b"\x00\x00\x00\x00" + build()[8:],  # no magic cookie (RFC 3489 style)
        build(attrs=attr(0x8022, b"abcd"))[:-1],  # length field lies
        struct.pack("!HHI12s", 1, 2, stun.COOKIE, TXID) + b"\x00\x00",  # length not a multiple of 4
        build(attrs=struct.pack("!HH", 0x8022, 40) + b"abcd"),  # attribute runs past the end
        build(attrs=b"\x80\x22"),  # truncated attribute header
        build(Method.BINDING, Class.RESPONSE),
        build(Method.BINDING, Class.ERROR),
        build(0x00B, Class.INDICATION),  # unknown indication
        build(Method.SEND, Class.INDICATION, attr(0x7777, b"x")),  # indication, unknown attr
    ],
)
def test_garbage_is_dropped(raw: bytes) -> None:
    with pytest.raises(stun.Malformed):
        stun.decode(raw)


def _with_fingerprint(message: Message) -> bytes:
    message.add_fingerprint()
    return bytes(message)


def test_fingerprint_is_checked_and_must_be_last() -> None:
    good = _with_fingerprint(Message(Method.BINDING, Class.REQUEST, TXID))
    assert stun.decode(good).attributes["FINGERPRINT"]
    bad = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(stun.Malformed, match="FINGERPRINT"):
        stun.decode(bad)
    trailing = attr(0x8022, b"late")
    after = good[:2] + struct.pack("!H", len(good) - 20 + len(trailing)) + good[4:] + trailing
    with pytest.raises(stun.Malformed):
        stun.decode(after)


# --- what gets an error answer ----------------------------------------------------------------


def test_unknown_comprehension_required_attribute_is_420_with_the_list() -> None:
    raw = build(attrs=attr(0x7F01, b"x") + attr(0x8022, b"ok") + attr(0x0031, b""))
    with pytest.raises(stun.BadRequest) as info:
        stun.decode(raw)
    assert info.value.code == 420
    assert info.value.unknown == [0x7F01, 0x0031]


def test_unknown_comprehension_optional_attribute_is_ignored() -> None:
    request = stun.decode(build(attrs=attr(0xC0FE, b"whatever")))
    assert request.method == Method.BINDING


def test_unknown_method_request_is_400() -> None:
    with pytest.raises(stun.BadRequest) as info:
        stun.decode(build(0x00B))
    assert info.value.code == 400


@pytest.mark.parametrize(
    "attrs",
    [
        attr(0x0008, b"\x00" * 19),  # MESSAGE-INTEGRITY of the wrong size
        attr(0x000D, b"\x00\x00\x02"),  # LIFETIME of 3 bytes
        attr(0x0019, b"\x11\x00\x00\x00\x00"),  # REQUESTED-TRANSPORT of 5 bytes
        attr(0x0012, b"\x00\x03\x00\x01\x01\x02\x03\x04"),  # XOR-PEER-ADDRESS, family 3
        attr(0x0012, b"\x00\x01\x00"),  # XOR-PEER-ADDRESS too short
        attr(0x0018, b"\x80\x00"),  # EVEN-PORT of 2 bytes
        attr(0x0006, b"\xff\xfe"),  # USERNAME that is not UTF-8
        attr(0x0006, b"u" * 600),  # USERNAME over 513 bytes
    ],
)
def test_malformed_attribute_in_a_request_is_400(attrs: bytes) -> None:
    with pytest.raises(stun.BadRequest) as info:
        stun.decode(build(Method.ALLOCATE, attrs=attrs))
    assert info.value.code == 400


def test_attributes_after_message_integrity_are_ignored() -> None:
    message = Message(Method.ALLOCATE, Class.REQUEST, TXID, {"USERNAME": "u"})
    message.add_message_integrity(b"k")
    del message.attributes["FINGERPRINT"]
    raw = bytes(message) + attr(0x000D, struct.pack("!I", 99))
    raw = raw[:2] + struct.pack("!H", len(raw) - 20) + raw[4:]
    request = stun.decode(raw)
    assert "LIFETIME" not in request.attributes
    assert request.check_integrity(b"k")


def test_first_of_a_repeated_attribute_wins_but_every_peer_is_kept() -> None:
    m = Message(Method.CREATE_PERMISSION, Class.REQUEST, TXID)
    peers = [("192.0.2.1", 1), ("198.51.100.2", 2), ("2001:db8::3", 3)]
    body = (
        b"".join(attr(0x0012, aiostun.pack_xor_address(p, TXID)) for p in peers)
        + attr(0x000D, struct.pack("!I", 1))
        + attr(0x000D, struct.pack("!I", 2))
    )
    raw = build(m.message_method, m.message_class, body)
    request = stun.decode(raw)
    assert request.peers == peers
    assert request.attributes["LIFETIME"] == 1
    assert request.attributes["XOR-PEER-ADDRESS"] == peers[0]


def test_turn_attributes_are_registered_and_round_trip() -> None:
    m = Message(Method.ALLOCATE, Class.REQUEST, TXID)
    m.attributes.update(
        {
            "EVEN-PORT": True,
            "REQUESTED-ADDRESS-FAMILY": 1,
            "DONT-FRAGMENT": None,
            "RESERVATION-TOKEN": b"12345678",
            "REQUESTED-TRANSPORT": 0x11000000,
        }
    )
    request = stun.decode(bytes(m))
    assert request.attributes["EVEN-PORT"] is True
    assert request.attributes["REQUESTED-ADDRESS-FAMILY"] == 1
    assert "DONT-FRAGMENT" in request.attributes
    assert request.attributes["RESERVATION-TOKEN"] == b"12345678"


# --- responses ----------------------------------------------------------------------------------


def test_responses_carry_software_integrity_and_fingerprint_as_asked() -> None:
    responder = stun.Responder("p2pserver-test")
    plain = stun.decode(bytes(Message(Method.BINDING, Class.REQUEST, TXID)))
    raw = responder.success(plain, {"XOR-MAPPED-ADDRESS": ("192.0.2.9", 4242)})
    answer = parse_message(raw)
    assert answer.message_class == Class.RESPONSE and answer.transaction_id == TXID
    assert answer.attributes["SOFTWARE"] == "p2pserver-test"
    assert "FINGERPRINT" not in answer.attributes and "MESSAGE-INTEGRITY" not in answer.attributes

    fingerprinted = stun.decode(_with_fingerprint(Message(Method.BINDING, Class.REQUEST, TXID)))
    answer = parse_message(responder.success(fingerprinted, {}, key=b"key"))
    assert "FINGERPRINT" in answer.attributes  # parse_message checked it
    assert answer.check_message_integrity(b"key")

    error = parse_message(responder.error(plain, 403, key=b"key"))
    assert error.error_code == 403 and error.attributes["ERROR-CODE"][1] == "Forbidden"
    assert error.check_message_integrity(b"key")


def test_aioice_tables_are_left_as_aioice_defines_them() -> None:
    """The server's attribute tables are its codec's own: aioice.stun's, which the aioice and
    aiortc clients of the real-client tests use in this same process, stay unpatched."""
    import p2pserver.app
    import p2pserver.turn.server  # noqa: F401

    pristine_by_type = {entry[0]: entry for entry in aiostun.ATTRIBUTES}
    pristine_by_name = {entry[1]: entry for entry in aiostun.ATTRIBUTES}
    assert pristine_by_type == aiostun.ATTRIBUTES_BY_TYPE
    assert pristine_by_name == aiostun.ATTRIBUTES_BY_NAME
    assert "RESERVATION-TOKEN" not in aiostun.ATTRIBUTES_BY_NAME
    assert aiostun.ATTRIBUTES_BY_NAME["LIFETIME"][3] is aiostun.unpack_unsigned
    # ...while the server's codec has the TURN attributes and its strict readers.
    assert "RESERVATION-TOKEN" in stun.ATTRIBUTES_BY_NAME
    assert stun.ATTRIBUTES_BY_NAME["LIFETIME"][3] is not aiostun.unpack_unsigned


# --- the Binding fast path (stun.BindingAnswerer) ----------------------------------------------


@pytest.mark.parametrize("name", ["ipv4_response", "ipv6_response"])
def test_xor_address_packer_matches_rfc5769(name: str) -> None:
    """The hand-written XOR-MAPPED-ADDRESS writes the bytes of RFC 5769 §2.2 and §2.3."""
    raw = vector(name)
    ip, port = VECTORS[name]["xor_mapped_address"]
    pos = 20
    while struct.unpack_from("!H", raw, pos)[0] != 0x0020:
        pos += 4 + struct.unpack_from("!H", raw, pos + 2)[0]
        pos += -pos & 3
    length = struct.unpack_from("!H", raw, pos + 2)[0]
    expected = raw[pos + 4 : pos + 4 + length]
    assert stun.pack_xor_address((ip, port), raw[8:20]) == expected
    assert aiostun.pack_xor_address((ip, port), raw[8:20]) == expected


def binding_requests() -> list[bytes]:
    """Plain Bindings the fast path answers, and near misses it must hand to the strict path."""
    software = attr(0x8022, "tëst".encode())
    plain = [build(), build(attrs=software)]
    with_fp = []
    for message in plain:
        longer = message[:2] + (len(message) - 12).to_bytes(2) + message[4:]
        crc = zlib.crc32(longer) ^ 0x5354554E
        with_fp.append(longer + attr(0x8028, crc.to_bytes(4)))
    good = plain + with_fp
    near = [
        with_fp[0][:-1] + bytes([with_fp[0][-1] ^ 1]),  # wrong FINGERPRINT
        with_fp[0] + software[:0],
        build(attrs=attr(0x8022, b"\xff\xfe")),  # SOFTWARE that is not UTF-8: 400
        build(attrs=attr(0x0024, b"\x00\x00\x00\x01")),  # PRIORITY: known, strict path
        build(attrs=attr(0x0029, bytes(8))),  # ICE-CONTROLLED
        build(attrs=attr(0x7FFF, b"")),  # unknown comprehension-required: 420
        build(attrs=attr(0x8022, b"ab")[:-2]),  # padding missing
        build()[:-1],  # not a whole header
        build(cls=Class.INDICATION),
        build(attrs=attr(0x8028, bytes(4)) + software),  # FINGERPRINT not last
        vector("short_term_request"),  # RFC 5769 §2.1: USERNAME, MESSAGE-INTEGRITY, ...
        build()[:4] + b"\x00\x00\x00\x00" + build()[8:],  # no magic cookie (RFC 3489)
    ]
    rng = random.Random(9)
    mutated = []
    for _ in range(3000):
        raw = bytearray(rng.choice(good))
        for _ in range(rng.randint(1, 3)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        mutated.append(bytes(raw[: rng.choice([len(raw), rng.randrange(len(raw) + 1)])]))
    return good + near + mutated


@pytest.mark.parametrize("remote", [("192.0.2.1", 32853), ("2001:db8::1", 40000)])
def test_binding_fast_path_answers_exactly_as_the_strict_path(remote: tuple[str, int]) -> None:
    """Every Binding the fast path takes gets the bytes the strict path (decode, Responder)
    gives it; every one it refuses goes to the strict path. Plain ones are taken."""
    settings = Settings(http=False, software="p2pserver test")
    # The same nonce key, so the 401s some mutations get are the same bytes too.
    fast = TurnCore(settings, _NoRelays(), PeerPolicy(), nonces=Nonces(b"k" * 32))  # type: ignore[arg-type]
    strict = TurnCore(settings, _NoRelays(), PeerPolicy(), nonces=Nonces(b"k" * 32))  # type: ignore[arg-type]
    strict.binding.answer = lambda data, remote: None  # type: ignore[method-assign]
    client = Client("udp", remote, ("192.0.2.2", 3478), lambda data: None)
    taken = 0
    for raw in binding_requests():
        by_hand = fast.binding.answer(raw, remote)
        expected = strict.handle(raw, client, 0.0)
        if by_hand is not None:
            taken += 1
            assert by_hand == expected, raw.hex()
        assert fast.handle(raw, client, 0.0) == expected, raw.hex()
    assert taken >= 4  # the plain ones at least
    assert fast.stats.requests == strict.stats.requests


class _NoRelays:
    families = frozenset({1})


@pytest.mark.parametrize("code", [401, 438])
@pytest.mark.parametrize("realm", ["test.realm", "réalm"])
def test_challenge_by_hand_is_what_the_responder_writes(code: int, realm: str) -> None:
    responder = stun.Responder("p2pserver test", realm)
    nonce = b"0123abcd" * 4
    for attrs in (b"", attr(0x0019, bytes((17, 0, 0, 0)))):
        message = build(Method.ALLOCATE, attrs=attrs)
        longer = message[:2] + (len(message) - 12).to_bytes(2) + message[4:]
        signed = longer + attr(0x8028, (zlib.crc32(longer) ^ 0x5354554E).to_bytes(4))
        for raw in (message, signed):
            request = stun.decode(raw)
            expected = responder.error(request, code, attributes={"REALM": realm, "NONCE": nonce})
            assert responder.challenge(request, code, nonce) == expected
