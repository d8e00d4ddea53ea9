"""STUN messages: what aioice.stun lacks, strict validation before it is trusted, and responses.

aioice parses leniently (it skips attributes that do not fit, keeps the last of repeated ones and
accepts a missing magic cookie), so `decode()` walks every message itself first and only then
decodes the attribute values with aioice's value functions.

The attribute tables are this codec's own: a copy of aioice's with the TURN attributes it lacks
and stricter readers. aioice's global tables are never changed, so an aioice or aiortc client in
the same process (the tests run them next to the server) is the library as published.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from aioice import stun
from aioice.stun import Class, Message, Method

HEADER = 20
COOKIE = stun.COOKIE
COOKIE_BYTES = struct.pack("!I", COOKIE)
FINGERPRINT_XOR = stun.FINGERPRINT_XOR

# Attribute types this server reads by number (RFC 8489 §18.3, RFC 8656 §18).
XOR_MAPPED_ADDRESS = 0x0020
SOFTWARE = 0x8022
MESSAGE_INTEGRITY = 0x0008
MESSAGE_INTEGRITY_SHA256 = 0x001C
FINGERPRINT = 0x8028
XOR_PEER_ADDRESS = 0x0012
DATA = 0x0013

# Methods this server answers (RFC 8656 §17); any other request gets 400.
REQUEST_METHODS = frozenset(
    {Method.BINDING, Method.ALLOCATE, Method.REFRESH, Method.CREATE_PERMISSION, Method.CHANNEL_BIND}
)

MAX_USERNAME = 513  # RFC 8489 §14.3
MAX_REALM_NONCE = 763  # RFC 8489 §14.9, §14.10


def _pack_even_port(value: bool) -> bytes:
    return b"\x80" if value else b"\x00"


def _unpack_even_port(data: bytes) -> bool:
    if len(data) != 1:
        raise ValueError("EVEN-PORT must be 1 byte")
    return bool(data[0] & 0x80)


def _pack_family(value: int) -> bytes:
    return bytes((value, 0, 0, 0))


def _unpack_family(data: bytes) -> int:
    if len(data) != 4:
        raise ValueError("address family attribute must be 4 bytes")
    return data[0]


def _pack_token(value: bytes) -> bytes:
    return value


def _unpack_token(data: bytes) -> bytes:
    if len(data) != 8:
        raise ValueError("RESERVATION-TOKEN must be 8 bytes")
    return data


def _pack_none(value: None) -> bytes:
    return b""


def _unpack_none(data: bytes) -> None:
    if data:
        raise ValueError("attribute must be empty")


def _pack_unknown(value: list[int]) -> bytes:
    return struct.pack(f"!{len(value)}H", *value)


def _unpack_unknown(data: bytes) -> list[int]:
    if len(data) % 2:
        raise ValueError("UNKNOWN-ATTRIBUTES must have an even length")
    return list(struct.unpack(f"!{len(data) // 2}H", data))


def _unpack_u32(data: bytes) -> int:
    if len(data) != 4:
        raise ValueError("attribute must be 4 bytes")
    return cast(int, struct.unpack("!I", data)[0])


def _unpack_channel(data: bytes) -> int:
    if len(data) != 4:
        raise ValueError("CHANNEL-NUMBER must be 4 bytes")
    return cast(int, struct.unpack("!H", data[:2])[0])


# Attributes aioice does not know.
_EXTRA: list[stun.AttributeEntry] = [
    (0x000A, "UNKNOWN-ATTRIBUTES", _pack_unknown, _unpack_unknown),
    (0x0017, "REQUESTED-ADDRESS-FAMILY", _pack_family, _unpack_family),
    (0x0018, "EVEN-PORT", _pack_even_port, _unpack_even_port),
    (0x001A, "DONT-FRAGMENT", _pack_none, _unpack_none),
    (0x001C, "MESSAGE-INTEGRITY-SHA256", stun.pack_bytes, stun.unpack_bytes),
    (0x001D, "PASSWORD-ALGORITHM", stun.pack_bytes, stun.unpack_bytes),
    (0x001E, "USERHASH", stun.pack_bytes, stun.unpack_bytes),
    (0x0022, "RESERVATION-TOKEN", _pack_token, _unpack_token),
    (0x002A, "CONNECTION-ID", stun.pack_unsigned, _unpack_u32),
    (0x8000, "ADDITIONAL-ADDRESS-FAMILY", _pack_family, _unpack_family),
    (0x8001, "ADDRESS-ERROR-CODE", stun.pack_bytes, stun.unpack_bytes),
    (0x8002, "PASSWORD-ALGORITHMS", stun.pack_bytes, stun.unpack_bytes),
    (0x8003, "ALTERNATE-DOMAIN", stun.pack_bytes, stun.unpack_bytes),
    (0x8004, "ICMP", stun.pack_bytes, stun.unpack_bytes),
    (0x8023, "ALTERNATE-SERVER", stun.pack_address, stun.unpack_address),
]


def pack_xor_address(value: tuple[str, int], transaction_id: bytes) -> bytes:
    """XOR-MAPPED/-RELAYED/-PEER-ADDRESS (RFC 8489 §14.2) with struct and inet_pton: the bytes
    aioice's pack_xor_address writes, without its ipaddress objects (a third of an answer's
    cost). Tested against RFC 5769's vectors."""
    ip, port = value[0], value[1]
    try:
        if ":" in ip:
            packed = socket.inet_pton(socket.AF_INET6, ip)
            mask = COOKIE_BYTES + transaction_id
            xip = (int.from_bytes(packed) ^ int.from_bytes(mask)).to_bytes(16)
            return _XOR_HEAD.pack(0, 2, port ^ 0x2112) + xip
        xip = (int.from_bytes(socket.inet_aton(ip)) ^ COOKIE).to_bytes(4)
    except OSError:  # what inet_pton does not take (a scoped IPv6 address): aioice's way
        return stun.pack_xor_address(value, transaction_id)
    return _XOR_HEAD.pack(0, 1, port ^ 0x2112) + xip


_XOR_HEAD = struct.Struct("!BBH")  # reserved, family, x-port

# aioice reads these leniently (a short LIFETIME raises struct.error, a long one is cut); be exact.
_STRICT: list[stun.AttributeEntry] = [
    (0x000C, "CHANNEL-NUMBER", stun.pack_unsigned_short, _unpack_channel),
    (0x000D, "LIFETIME", stun.pack_unsigned, _unpack_u32),
    (0x0019, "REQUESTED-TRANSPORT", stun.pack_unsigned, _unpack_u32),
]

# Written with the packer above; read with aioice's reader.
_FAST = [
    (atype, name, pack_xor_address, unpack)
    for atype, name, pack, unpack in stun.ATTRIBUTES
    if pack is stun.pack_xor_address
]

# This codec's tables: copies, so aioice.stun's own stay as aioice defines them.
ATTRIBUTES_BY_TYPE: dict[int, stun.AttributeEntry] = dict(stun.ATTRIBUTES_BY_TYPE)
ATTRIBUTES_BY_NAME: dict[str, stun.AttributeEntry] = dict(stun.ATTRIBUTES_BY_NAME)
for _entry in (*_EXTRA, *_STRICT, *_FAST):
    ATTRIBUTES_BY_TYPE[_entry[0]] = _entry
    ATTRIBUTES_BY_NAME[_entry[1]] = _entry

KNOWN_TYPES = frozenset(ATTRIBUTES_BY_TYPE)


class Repeated(tuple[Any, ...]):
    """An attribute value written once per item: the attribute repeats (e.g. two
    XOR-RELAYED-ADDRESS in a dual-stack Allocate success, RFC 8656 §7.2)."""


class TurnMessage(Message):
    """aioice's Message, written and read with this codec's tables (`parse_message`)."""

    integrity_data: bytes | None = None  # what MESSAGE-INTEGRITY covers, set by parse_message

    def __bytes__(self) -> bytes:
        body = bytearray()
        for name, value in self.attributes.items():
            atype, _, pack, _ = ATTRIBUTES_BY_NAME[name]
            for item in value if isinstance(value, Repeated) else (value,):
                xor = pack is pack_xor_address
                packed = pack(item, self.transaction_id) if xor else pack(item)
                body += struct.pack("!HH", atype, len(packed)) + packed + bytes(-len(packed) & 3)
        kind = self.message_method | self.message_class
        return struct.pack("!HHI12s", kind, len(body), COOKIE, self.transaction_id) + body

    def check_message_integrity(self, key: bytes) -> bool:
        integrity = self.attributes.get("MESSAGE-INTEGRITY")
        if self.integrity_data is None or integrity is None:
            return False
        expected = stun.message_integrity(self.integrity_data, key)
        return hmac.compare_digest(integrity, expected)  # constant time


def parse_message(data: bytes) -> TurnMessage:
    """Decode a STUN message with this codec's tables. Of a repeated attribute the first counts
    (RFC 8489 §14); after MESSAGE-INTEGRITY only FINGERPRINT is read (RFC 8489 §14.5). Raises
    ValueError (or struct.error from a value reader) on what does not decode."""
    if len(data) < HEADER:
        raise ValueError("STUN message shorter than 20 bytes")
    mtype, length, _, txid = struct.unpack_from("!HHI12s", data)
    if HEADER + length != len(data):
        raise ValueError("STUN message length does not match")
    attributes: dict[str, Any] = {}
    integrity_data: bytes | None = None
    after_integrity = False
    pos = HEADER
    while pos + 4 <= len(data):
        atype, alen = struct.unpack_from("!HH", data, pos)
        value = data[pos + 4 : pos + 4 + alen]
        entry = ATTRIBUTES_BY_TYPE.get(atype)
        if entry is not None and (not after_integrity or atype == FINGERPRINT):
            _, name, _, unpack = entry
            if name not in attributes:
                if unpack is stun.unpack_xor_address:
                    attributes[name] = unpack(value, transaction_id=txid)
                else:
                    attributes[name] = unpack(value)
            if atype == FINGERPRINT:
                if attributes[name] != stun.message_fingerprint(data[:pos]):
                    raise ValueError("STUN message fingerprint does not match")
            elif atype == MESSAGE_INTEGRITY:
                integrity_data, after_integrity = data[:pos], True
            elif atype == MESSAGE_INTEGRITY_SHA256:
                after_integrity = True
        pos += 4 + alen + (-alen & 3)
    message = TurnMessage(Method(mtype & 0x3EEF), Class(mtype & 0x0110), txid, attributes)
    message.integrity_data = integrity_data
    return message


class Malformed(ValueError):
    """The bytes are not a STUN message this server may answer: drop them silently."""


class BadRequest(ValueError):
    """A well-framed request that is invalid: answer 400 (or `code`) with this reason."""

    def __init__(self, reason: str, code: int = 400, unknown: list[int] | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.unknown = unknown or []


@dataclass
class Request:
    """A validated STUN message: aioice's decoded Message plus what aioice drops."""

    message: TurnMessage
    raw: bytes
    method: int
    cls: int
    peers: list[tuple[str, int]] = field(default_factory=list)  # every XOR-PEER-ADDRESS, in order

    @property
    def transaction_id(self) -> bytes:
        return self.message.transaction_id

    @property
    def attributes(self) -> dict[str, Any]:
        return self.message.attributes

    @property
    def signed(self) -> bool:
        return "MESSAGE-INTEGRITY" in self.message.attributes

    def check_integrity(self, key: bytes) -> bool:
        return self.message.check_message_integrity(key)  # compare_digest inside: constant time


def header(data: bytes) -> tuple[int, int, int] | None:
    """(method, class, length) of a plausible STUN header (RFC 8489 §5), else None."""
    if len(data) < HEADER or data[0] & 0xC0 or data[4:8] != COOKIE_BYTES:
        return None
    mtype, length = struct.unpack_from("!HH", data)
    if length & 3:
        return None
    return mtype & 0x3EEF, mtype & 0x0110, length


def decode(data: bytes) -> Request:
    """Validate a whole STUN message (RFC 8489 §6.3) and decode it with aioice.

    Raises Malformed for bytes to drop (not STUN, broken framing, bad FINGERPRINT, a response
    or an unknown indication), BadRequest for a request to answer with an error.
    """
    head = header(data)
    if head is None:
        raise Malformed("not a STUN message")
    method, cls, length = head
    if HEADER + length != len(data):
        raise Malformed("length field does not match the datagram")
    if cls in (Class.RESPONSE, Class.ERROR):
        raise Malformed("responses are not for a server")
    is_request = cls == Class.REQUEST

    txid = data[8:20]
    unknown: list[int] = []
    peers: list[tuple[str, int]] = []
    pos = HEADER
    after_integrity = False
    fingerprint_seen = False
    while pos < len(data):
        if pos + 4 > len(data):
            raise Malformed("truncated attribute header")
        atype, alen = struct.unpack_from("!HH", data, pos)
        end = pos + 4 + alen
        if end > len(data):
            raise Malformed("attribute runs past the message")
        padded = end + (-alen & 3)
        if padded > len(data):
            raise Malformed("attribute padding runs past the message")
        if fingerprint_seen:
            raise Malformed("FINGERPRINT is not the last attribute")  # RFC 8489 §14.7
        value = data[pos + 4 : end]
        if atype == FINGERPRINT:
            fingerprint_seen = True
            if alen != 4:
                raise Malformed("FINGERPRINT must be 4 bytes")
            expected = binascii.crc32(_with_length(data[:pos], pos + 8 - HEADER)) ^ FINGERPRINT_XOR
            if struct.unpack("!I", value)[0] != expected:
                raise Malformed("FINGERPRINT does not match")
        elif after_integrity:
            pass  # RFC 8489 §14.5: ignore what follows MESSAGE-INTEGRITY, but FINGERPRINT
        elif atype == MESSAGE_INTEGRITY:
            if alen != 20:
                raise (
                    BadRequest("MESSAGE-INTEGRITY must be 20 bytes") if is_request else Malformed()
                )
            after_integrity = True
        elif atype == MESSAGE_INTEGRITY_SHA256:
            after_integrity = True
        elif atype == XOR_PEER_ADDRESS:
            try:
                peers.append(stun.unpack_xor_address(value, txid))
            except ValueError as exc:
                if is_request:
                    raise BadRequest(f"bad XOR-PEER-ADDRESS: {exc}") from None
                raise Malformed(str(exc)) from None
        elif atype not in KNOWN_TYPES and atype < 0x8000:
            unknown.append(atype)  # comprehension-required (RFC 8489 §14)
        pos = padded

    if not is_request and cls != Class.INDICATION:
        raise Malformed("unexpected class")
    if unknown:
        if is_request:
            raise BadRequest("Unknown comprehension-required attribute", 420, unknown)
        raise Malformed("indication with an unknown comprehension-required attribute")
    if method not in REQUEST_METHODS and (is_request or method != Method.SEND):
        if is_request:
            raise BadRequest("Unsupported method")
        raise Malformed("unknown indication")

    try:
        message = parse_message(data)
    except (ValueError, struct.error, IndexError) as exc:
        if is_request:
            raise BadRequest(f"Malformed attribute: {exc}") from None
        raise Malformed(str(exc)) from None
    if is_request:
        _check_lengths(message)
    return Request(message=message, raw=data, method=method, cls=cls, peers=peers)


def _with_length(prefix: bytes, length: int) -> bytes:
    return prefix[:2] + struct.pack("!H", length) + prefix[4:]


def _check_lengths(message: TurnMessage) -> None:
    attrs = message.attributes
    if len(attrs.get("USERNAME", "").encode()) > MAX_USERNAME:
        raise BadRequest("USERNAME too long")
    if len(attrs.get("REALM", "").encode()) > MAX_REALM_NONCE:
        raise BadRequest("REALM too long")
    if len(attrs.get("NONCE", b"")) > MAX_REALM_NONCE:
        raise BadRequest("NONCE too long")


REASONS = {
    300: "Try Alternate",
    400: "Bad Request",
    401: "Unauthenticated",
    403: "Forbidden",
    420: "Unknown Attribute",
    437: "Allocation Mismatch",
    438: "Stale Nonce",
    440: "Address Family not Supported",
    441: "Wrong Credentials",
    442: "Unsupported Transport Protocol",
    443: "Peer Address Family Mismatch",
    486: "Allocation Quota Reached",
    500: "Server Error",
    508: "Insufficient Capacity",
}


BINDING_REQUEST = b"\x00\x01"  # the first two bytes of a Binding request (RFC 8489 §5)
SEND_INDICATION = b"\x00\x16"  # and of a Send indication (RFC 8656 §11.1)
_HEAD = struct.Struct("!HHI")  # type, length, magic cookie (the transaction id follows)
_ATTR = struct.Struct("!HH")


class BindingAnswerer:
    """The answer to a plain Binding request, by hand: the commonest STUN message (every ICE
    agent sends it to learn its reflexive address) without decoding it into a Message.

    "Plain" means: a well-framed request (RFC 8489 §6.3) whose attributes are only SOFTWARE
    (valid UTF-8) and FINGERPRINT (last, and correct). Its answer is byte for byte what
    Responder writes for it: XOR-MAPPED-ADDRESS, SOFTWARE, and FINGERPRINT when the request had
    one. Anything else returns None and goes the one strict path (`decode`, `Responder`), so a
    malformed or unusual Binding gets the answer it always got."""

    def __init__(self, software: str) -> None:
        value = software.encode()
        self._software = _ATTR.pack(SOFTWARE, len(value)) + value + bytes(-len(value) & 3)

    def answer(self, data: bytes, remote: tuple[str, int]) -> bytes | None:
        size = len(data)
        if size < HEADER or data[:2] != BINDING_REQUEST or data[4:8] != COOKIE_BYTES:
            return None
        if HEADER + _ATTR.unpack_from(data, 2)[0] != size or size & 3:
            return None
        fingerprint = False
        pos = HEADER
        while pos < size:
            if fingerprint or pos + 4 > size:
                return None  # FINGERPRINT must be last (RFC 8489 §14.7)
            atype, alen = _ATTR.unpack_from(data, pos)
            end = pos + 4 + alen
            if end + (-alen & 3) > size:
                return None
            if atype == FINGERPRINT:
                if alen != 4:
                    return None
                crc = binascii.crc32(data[:pos]) ^ FINGERPRINT_XOR  # length already counts it
                if int.from_bytes(data[pos + 4 : end]) != crc:
                    return None
                fingerprint = True
            elif atype == SOFTWARE:
                try:
                    data[pos + 4 : end].decode()
                except UnicodeDecodeError:
                    return None  # the strict path answers 400
            else:
                return None
            pos = end + (-alen & 3)
        txid = data[8:20]
        mapped = pack_xor_address(remote, txid)
        body = _ATTR.pack(XOR_MAPPED_ADDRESS, len(mapped)) + mapped + self._software
        length = len(body) + (8 if fingerprint else 0)
        reply = _HEAD.pack(0x0101, length, COOKIE) + txid + body
        if fingerprint:
            crc = binascii.crc32(reply) ^ FINGERPRINT_XOR
            reply += _ATTR.pack(FINGERPRINT, 4) + crc.to_bytes(4)
        return reply


def _error_code(code: int, reason: str) -> bytes:
    """The ERROR-CODE attribute (RFC 8489 §14.8), as aioice's pack_error_code writes it."""
    value = struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode()
    return _ATTR.pack(0x0009, len(value)) + value + bytes(-len(value) & 3)


class Responder:
    """Builds the responses of this server: SOFTWARE on each, then MESSAGE-INTEGRITY when signed
    and FINGERPRINT when the request carried one (RFC 8489 §14.7: a client that uses it expects
    it back)."""

    def __init__(
        self, software: str, realm: str = "", on_error: Callable[[int], None] | None = None
    ) -> None:
        self.software = software
        self.on_error = on_error  # counts error responses by code (stats.py)
        value = software.encode()
        self._software = _ATTR.pack(SOFTWARE, len(value)) + value + bytes(-len(value) & 3)
        realm_value = realm.encode()
        realm_attr = _ATTR.pack(0x0014, len(realm_value)) + realm_value
        realm_attr += bytes(-len(realm_value) & 3)
        # ERROR-CODE and REALM of the two challenges, as Responder.error writes them.
        self._challenges = {
            code: _error_code(code, REASONS[code]) + realm_attr for code in (401, 438)
        }

    def challenge(self, request: Request, code: int, nonce: bytes) -> bytes:
        """401 or 438 with REALM and a fresh NONCE (RFC 8489 §9.2.4): what `error` writes for
        it, by hand, because every client gets one before anything else."""
        if self.on_error is not None:
            self.on_error(code)
        nonce_attr = _ATTR.pack(0x0015, len(nonce)) + nonce + bytes(-len(nonce) & 3)
        body = self._challenges[code] + nonce_attr + self._software
        fingerprint = "FINGERPRINT" in request.attributes
        length = len(body) + (8 if fingerprint else 0)
        kind = request.method | Class.ERROR
        reply = _HEAD.pack(kind, length, COOKIE) + request.transaction_id + body
        if fingerprint:
            crc = binascii.crc32(reply) ^ FINGERPRINT_XOR
            reply += _ATTR.pack(FINGERPRINT, 4) + crc.to_bytes(4)
        return reply

    def success(
        self, request: Request, attributes: dict[str, Any], key: bytes | None = None
    ) -> bytes:
        return self._finish(request, Class.RESPONSE, attributes, key)

    def error(
        self,
        request: Request | None,
        code: int,
        reason: str | None = None,
        key: bytes | None = None,
        attributes: dict[str, Any] | None = None,
        *,
        method: int = 0,
        transaction_id: bytes = b"",
    ) -> bytes:
        if self.on_error is not None:
            self.on_error(code)
        attrs: dict[str, Any] = {"ERROR-CODE": (code, reason or REASONS.get(code, "Error"))}
        attrs.update(attributes or {})
        if request is None:  # a request that could not be decoded: answer from its header alone
            message = TurnMessage(cast(Method, method), Class.ERROR, transaction_id, attrs)
            message.attributes["SOFTWARE"] = self.software
            return bytes(message)
        return self._finish(request, Class.ERROR, attrs, key)

    def _finish(
        self, request: Request, cls: Class, attributes: dict[str, Any], key: bytes | None
    ) -> bytes:
        message = TurnMessage(cast(Method, request.method), cls, request.transaction_id, {})
        message.attributes.update(attributes)
        message.attributes["SOFTWARE"] = self.software
        reply = bytes(message)  # encoded once; what follows is appended (aioice encodes 3 times)
        if key is not None:  # RFC 8489 §14.5: the length field counts MESSAGE-INTEGRITY
            reply = _with_length(reply, len(reply) - HEADER + 24)
            mac = hmac.new(key, reply, hashlib.sha1).digest()
            reply += _ATTR.pack(MESSAGE_INTEGRITY, 20) + mac
        if "FINGERPRINT" in request.attributes:  # RFC 8489 §14.7: and then FINGERPRINT
            reply = _with_length(reply, len(reply) - HEADER + 8)
            crc = binascii.crc32(reply) ^ FINGERPRINT_XOR
            reply += _ATTR.pack(FINGERPRINT, 4) + crc.to_bytes(4)
        return reply
