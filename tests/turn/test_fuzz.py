"""Fuzzing the STUN/TURN server with malformed and mutated messages.

The corpus starts from valid messages (Binding, Allocate with and without auth, Refresh,
CreatePermission, ChannelBind, Send indications, ChannelData), signed with a real nonce and key
so that mutations made before signing reach the handlers behind authentication, then mutates
them: attribute drops, duplicates, insertions, type and value corruption, method changes, bad
credentials, and byte-level bit flips, truncation, length-field lies, wrong cookies and splices.

- In-process (sans-I/O): 120k messages through TurnCore.handle() and the ChannelData path, which
  must never raise and must answer only with well-formed responses; plus Hypothesis-built
  attribute lists.
- Over real sockets: 20k UDP datagrams and 300 TCP streams at a running TurnServer, with Binding
  requests over UDP and TCP interleaved; no handler may fail, Binding must keep working, and the
  log stays at a rate-limited line. On asyncio's event loop and on uvloop (`both_loops`).
- The TCP framer and datapath.parse_send, directly.

Everything is driven by one seed: FUZZ_SEED=<n> replays a run (the seed is printed).
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import hmac
import ipaddress
import itertools
import logging
import os
import random
import socket
import struct
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from aioice.stun import Class, Method
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from stunclient import StunClient

from p2pserver.config import Settings
from p2pserver.credentials import rest_password
from p2pserver.turn.allocation import FiveTuple, NoCapacity
from p2pserver.turn.auth import Nonces, long_term_key
from p2pserver.turn.datapath import _parse_send_any, parse_send
from p2pserver.turn.framing import FramingError, StreamFramer
from p2pserver.turn.handlers import Client, TurnCore
from p2pserver.turn.policy import PeerPolicy
from p2pserver.turn.server import TCP_MAX_BUFFERED, TurnServer
from p2pserver.turn.stun import KNOWN_TYPES, TurnMessage, parse_message

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("FUZZ_SEED", "20261130"))
USER, PASSWORD, REALM = "alice", "wonderland", "test.realm"  # as in conftest.py
SECRET = "test-shared-secret"
NOW = 1_800_000_000.0  # the in-process clock: fixed, so that a seed replays exactly
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")

COOKIE_BYTES = b"\x21\x12\xa4\x42"
MAX_UDP = 65507  # the largest IPv4 UDP payload
MAX_STUN = 20 + 65532  # the largest STUN message (its length is a multiple of 4): TCP only

# Attribute types (RFC 8489 §18.3, RFC 8656 §18).
USERNAME, MESSAGE_INTEGRITY, ERROR_CODE, CHANNEL_NUMBER = 0x0006, 0x0008, 0x0009, 0x000C
LIFETIME, XOR_PEER_ADDRESS, DATA, REALM_ATTR, NONCE = 0x000D, 0x0012, 0x0013, 0x0014, 0x0015
REQUESTED_FAMILY, EVEN_PORT, REQUESTED_TRANSPORT = 0x0017, 0x0018, 0x0019
DONT_FRAGMENT, MESSAGE_INTEGRITY_SHA256, RESERVATION_TOKEN = 0x001A, 0x001C, 0x0022
ADDITIONAL_FAMILY, SOFTWARE, FINGERPRINT = 0x8000, 0x8022, 0x8028
ATTRIBUTE_TYPES = sorted(KNOWN_TYPES | {0x0000, 0x0002, 0x0021, 0x7FFF, 0x8FFF, 0xC001, 0xFFFF})

# Methods (TURN's and some that are not) and the four classes (RFC 8489 §5).
METHODS = [0x001, 0x002, 0x003, 0x004, 0x006, 0x007, 0x008, 0x009, 0x00A, 0x00B, 0x00C, 0xFFF]
CLASSES = [0x000, 0x010, 0x100, 0x110]
BINDING, ALLOCATE, REFRESH, CREATE_PERMISSION = 0x0001, 0x0003, 0x0004, 0x0008
CHANNEL_BIND, SEND_INDICATION, BINDING_INDICATION = 0x0009, 0x0016, 0x0011
KNOWN_METHODS = frozenset(int(m) for m in Method)
# Errors that only an authenticated request gets: they must carry MESSAGE-INTEGRITY.
AUTHENTICATED_ERRORS = frozenset({403, 437, 440, 441, 442, 443, 486, 508})


def message_type(method: int, cls: int) -> int:
    """Interleave a 12-bit method with the class bits (RFC 8489 §5)."""
    return ((method & 0xF80) << 2) | ((method & 0x070) << 1) | (method & 0x00F) | cls


def log_seed(what: str) -> None:
    print(f"\n{what}: fuzz seed {SEED} (FUZZ_SEED={SEED} replays it)")


# --- encoding --------------------------------------------------------------------------------

Attr = tuple[int, bytes]


def encode(mtype: int, txid: bytes, attrs: list[Attr], cookie: bytes = COOKIE_BYTES) -> bytes:
    body = b"".join(struct.pack("!HH", t, len(v)) + v + bytes(-len(v) & 3) for t, v in attrs)
    return struct.pack("!HH", mtype, len(body)) + cookie + txid + body


def add_integrity(message: bytes, key: bytes) -> bytes:
    """Append MESSAGE-INTEGRITY (RFC 8489 §14.5): HMAC-SHA1, the length covering itself."""
    head = message[:2] + struct.pack("!H", len(message) - 20 + 24) + message[4:]
    return head + struct.pack("!HH", MESSAGE_INTEGRITY, 20) + hmac.new(key, head, "sha1").digest()


def add_fingerprint(message: bytes) -> bytes:
    head = message[:2] + struct.pack("!H", len(message) - 20 + 8) + message[4:]
    return head + struct.pack("!HHI", FINGERPRINT, 4, binascii.crc32(head) ^ 0x5354554E)


def xor_address(ip: str, port: int, txid: bytes) -> bytes:
    packed = ipaddress.ip_address(ip).packed
    xip = bytes(a ^ b for a, b in zip(packed, COOKIE_BYTES + txid, strict=False))
    return struct.pack("!BBH", 0, 1 if len(packed) == 4 else 2, port ^ 0x2112) + xip


def attributes(message: bytes) -> Iterator[tuple[int, int, int]]:
    """(offset, type, length) of each attribute header that fits in the message."""
    pos = 20
    while pos + 4 <= len(message):
        atype, alen = struct.unpack_from("!HH", message, pos)
        yield pos, atype, alen
        pos += 4 + alen + (-alen & 3)


# --- the corpus ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cred:
    """Long-term credentials as a client holds them after a 401."""

    username: str
    realm: str
    nonce: bytes
    key: bytes


@dataclass
class Draft:
    """A message before encoding: mutations here still get a valid MESSAGE-INTEGRITY."""

    mtype: int
    txid: bytes
    attrs: list[Attr]
    cred: Cred | None = None  # sign with it (USERNAME, REALM, NONCE, MESSAGE-INTEGRITY)
    fingerprint: bool = False
    trailer: list[Attr] = field(default_factory=list)  # after MESSAGE-INTEGRITY: ignored


class Corpus:
    """Valid TURN messages and mutations of them, all drawn from one random.Random."""

    def __init__(self, rng: random.Random, peers: list[tuple[str, int]], max_size: int) -> None:
        self.rng = rng
        self.peers = peers  # where valid messages point (a sink); mutations go elsewhere too
        self.max_size = max_size  # of a datagram; TCP streams may carry MAX_STUN
        self.tokens: list[bytes] = []  # RESERVATION-TOKENs the server handed out
        self.recent: list[bytes] = []  # for retransmissions and splices
        self.kinds: Counter[str] = Counter()

    # -- valid messages --

    def txid(self) -> bytes:
        return self.rng.randbytes(12)

    def peer(self, txid: bytes) -> bytes:
        r = self.rng.random()
        if r < 0.75:
            ip, port = self.rng.choice(self.peers)
        elif r < 0.85:
            ip, port = "::1", self.rng.randrange(65536)
        elif r < 0.95:
            ip, port = f"127.0.0.{self.rng.randrange(256)}", self.rng.randrange(65536)
        else:
            ip, port = "198.51.100.7", 9  # documentation range: denied by the policy
        return xor_address(ip, port, txid)

    def payload(self) -> bytes:
        return self.rng.randbytes(self.rng.choice([0, 1, 3, 4, 17, 100, 500, 1200]))

    def channel(self) -> int:
        return self.rng.choice([0x4000, 0x4001, 0x4FFF, 0x7FFF, self.rng.randrange(0x4000, 0x8000)])

    def seed(self, cred: Cred | None) -> Draft:
        rng = self.rng
        txid = self.txid()
        kind = rng.choices(
            ["binding", "allocate", "refresh", "permission", "bind", "send", "indication"],
            weights=[10, 25, 10, 15, 15, 20, 5],
        )[0]
        self.kinds[kind] += 1
        fingerprint = rng.random() < 0.25
        if kind == "binding":
            attrs = [(SOFTWARE, b"fuzz")] if rng.random() < 0.3 else []
            return Draft(BINDING, txid, attrs, None, fingerprint)
        if kind == "indication":
            return Draft(BINDING_INDICATION, txid, [], None, fingerprint)
        if kind == "send":
            attrs = [(XOR_PEER_ADDRESS, self.peer(txid)), (DATA, self.payload())]
            if rng.random() < 0.1:
                attrs.append((DONT_FRAGMENT, b""))
            return Draft(SEND_INDICATION, txid, attrs, None, fingerprint)
        signed = cred if rng.random() < 0.85 else None
        if kind == "allocate":
            attrs = [(REQUESTED_TRANSPORT, bytes((17, 0, 0, 0)))]
            optional: list[Attr] = [
                (LIFETIME, struct.pack("!I", rng.choice([0, 1, 600, 3600, 0xFFFFFFFF]))),
                (EVEN_PORT, rng.choice([b"\x00", b"\x80"])),
                (DONT_FRAGMENT, b""),
                (REQUESTED_FAMILY, bytes((rng.choice([1, 1, 2, 3]), 0, 0, 0))),
                (ADDITIONAL_FAMILY, bytes((2, 0, 0, 0))),
                (RESERVATION_TOKEN, rng.choice([*self.tokens[-4:], rng.randbytes(8)])),
            ]
            attrs += [a for a in optional if rng.random() < 0.15]
        elif kind == "refresh":
            attrs = []
            if rng.random() < 0.8:
                lifetime = rng.choice([0, 0, 1, 600, 3600, 0xFFFFFFFF])
                attrs.append((LIFETIME, struct.pack("!I", lifetime)))
            if rng.random() < 0.1:
                attrs.append((REQUESTED_FAMILY, bytes((rng.choice([1, 2]), 0, 0, 0))))
        elif kind == "permission":
            attrs = [(XOR_PEER_ADDRESS, self.peer(txid)) for _ in range(rng.choice([1, 1, 2, 3]))]
        else:
            number = struct.pack("!HH", self.channel(), 0)
            attrs = [(CHANNEL_NUMBER, number), (XOR_PEER_ADDRESS, self.peer(txid))]
        method = {"allocate": ALLOCATE, "refresh": REFRESH, "permission": CREATE_PERMISSION}
        return Draft(method.get(kind, CHANNEL_BIND), txid, attrs, signed, fingerprint)

    def channel_data(self, tcp: bool) -> bytes:
        payload = self.payload()
        data = struct.pack("!HH", self.channel(), len(payload)) + payload
        return data + bytes(-len(data) & 3) if tcp else data

    def giant(self, cred: Cred | None, tcp: bool = False) -> bytes:
        """A message of the largest size the transport carries, ending in an attribute of 0 to 4
        value bytes: where length arithmetic overflows."""
        rng = self.rng
        txid = self.txid()
        mtype = rng.choice([SEND_INDICATION, SEND_INDICATION, ALLOCATE, BINDING])
        last = rng.choice([FINGERPRINT, FINGERPRINT, MESSAGE_INTEGRITY, DATA, SOFTWARE, 0x7FFF])
        tail = rng.randbytes(rng.randrange(5))
        size = MAX_STUN if tcp else min(self.max_size, MAX_STUN) & ~3
        head = [(XOR_PEER_ADDRESS, self.peer(txid))]
        if cred is not None and mtype != SEND_INDICATION:
            head += [(USERNAME, cred.username.encode()), (NONCE, cred.nonce)]
        used = (
            sum(4 + len(v) + (-len(v) & 3) for _, v in head) + 4 + 4 + len(tail) + (-len(tail) & 3)
        )
        return encode(mtype, txid, [*head, (DATA, bytes(size - 20 - used)), (last, tail)])

    def garbage(self) -> bytes:
        rng = self.rng
        data = bytearray(rng.randbytes(rng.choice([0, 1, 3, 4, 19, 20, 21, 24, 64, 300, 1500])))
        if data and rng.random() < 0.5:
            data[0] = rng.choice([0x00, 0x01, 0x40, 0x4F, 0x50, 0x7F, 0x80, 0xFF])
        if len(data) >= 8 and rng.random() < 0.5:
            data[4:8] = COOKIE_BYTES
        return bytes(data)

    # -- mutations before signing: these reach the handlers --

    def random_value(self) -> bytes:
        n = self.rng.choice([0, 1, 2, 3, 4, 5, 7, 8, 12, 16, 20, 32, 64, 513, 764, 1000])
        return self.rng.randbytes(n)

    def random_type(self) -> int:
        return self.rng.choice([*ATTRIBUTE_TYPES, self.rng.randrange(0x10000)])

    def mutate_draft(self, d: Draft) -> None:
        rng = self.rng
        attrs = d.attrs
        op = rng.randrange(14)
        if op == 0 and attrs:
            attrs.pop(rng.randrange(len(attrs)))
        elif op == 1 and attrs:
            attrs.insert(rng.randrange(len(attrs) + 1), rng.choice(attrs))  # a duplicate
        elif op == 2:
            attrs.insert(rng.randrange(len(attrs) + 1), (self.random_type(), self.random_value()))
        elif op == 3 and attrs:
            i = rng.randrange(len(attrs))
            attrs[i] = (attrs[i][0], self.corrupt_value(attrs[i][1]))
        elif op == 4 and attrs:
            i = rng.randrange(len(attrs))
            attrs[i] = (self.random_type(), attrs[i][1])
        elif op == 5:
            rng.shuffle(attrs)
        elif op == 6:
            d.mtype = message_type(rng.choice(METHODS), rng.choice(CLASSES))
        elif op == 7:
            d.mtype = rng.randrange(0x4000)
        elif op == 8:
            d.txid = self.txid()  # the XOR addresses now decode to somewhere else
        elif op == 9:
            d.fingerprint = not d.fingerprint
        elif op == 10 and d.cred is not None:
            d.cred = self.bad_cred(d.cred)
        elif op == 11:
            d.trailer.append((self.random_type(), self.random_value()))
        elif op == 12:
            attrs.append((MESSAGE_INTEGRITY_SHA256, rng.randbytes(rng.choice([0, 16, 32]))))
        elif op == 13:
            d.cred = None  # unsigned, but with a MESSAGE-INTEGRITY of its own
            attrs += [(USERNAME, USER.encode()), (REALM_ATTR, REALM.encode())]
            attrs.append((MESSAGE_INTEGRITY, rng.randbytes(rng.choice([0, 19, 20, 21]))))

    def corrupt_value(self, value: bytes) -> bytes:
        rng = self.rng
        op = rng.randrange(6)
        if op == 0 and value:
            i = rng.randrange(len(value))
            return value[:i] + bytes([value[i] ^ (1 << rng.randrange(8))]) + value[i + 1 :]
        if op == 1:
            return value[: rng.randrange(len(value) + 1)]
        if op == 2:
            return value + rng.randbytes(rng.choice([1, 2, 4, 100]))
        if op == 3:
            return rng.randbytes(len(value))
        if op == 4:
            return rng.choice([b"", b"\x00", b"\xff" * 4, b"\x00" * 4, b"\x80\x00\x00\x00"])
        return bytes(rng.choice([0, 1, 2, 3, 0xFF]) for _ in value)

    def bad_cred(self, cred: Cred) -> Cred:
        rng = self.rng
        user, realm, nonce, key = cred.username, cred.realm, cred.nonce, cred.key
        op = rng.randrange(6)
        if op == 0:
            key = rng.randbytes(16)
        elif op == 1:
            user = rng.choice(["nobody", "bob", "9" * 13 + ":x", "1:x", "é" * 300])
        elif op == 2:
            realm = "other.realm"
        elif op == 3:
            nonce = b"00000000" + nonce[8:]  # the right shape, a wrong MAC
        elif op == 4:
            nonce = rng.randbytes(rng.choice([0, 31, 32]))
        else:
            nonce = b"%08x" % rng.randrange(1 << 32) + nonce[8:]
        return Cred(user, realm, nonce, key)

    def render(self, d: Draft) -> bytes:
        attrs = list(d.attrs)
        if d.cred is not None:
            c = d.cred
            attrs += [
                (USERNAME, c.username.encode()),
                (REALM_ATTR, c.realm.encode()),
                (NONCE, c.nonce),
            ]
        data = encode(d.mtype, d.txid, attrs)
        if d.cred is not None:
            data = add_integrity(data, d.cred.key)
        if d.trailer:
            data += encode(0, b"", d.trailer)[20:]
            data = data[:2] + struct.pack("!H", len(data) - 20) + data[4:]
        return add_fingerprint(data) if d.fingerprint else data

    # -- mutations after signing: these mostly die in validation --

    def mutate_bytes(self, data: bytes) -> bytes:
        rng = self.rng
        b = bytearray(data)
        op = rng.randrange(11)
        if op == 0 and b:
            for _ in range(rng.choice([1, 1, 2, 8])):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2:
            del b[rng.randrange(len(b) + 1) :]
        elif op == 3:
            b += rng.randbytes(rng.choice([1, 2, 3, 4, 8, 20]))
        elif op == 4 and len(b) >= 4:
            length = int.from_bytes(b[2:4])
            lie = rng.choice([0, 4, 0xFFFC, 0xFFFF, length + 4, length - 4, length + 1])
            b[2:4] = (lie & 0xFFFF).to_bytes(2)
        elif op == 5:
            fields = list(attributes(bytes(b)))
            if fields:
                pos, _, alen = rng.choice(fields)
                if rng.random() < 0.5:
                    b[pos : pos + 2] = self.random_type().to_bytes(2)
                else:
                    lie = rng.choice(
                        [0, 1, alen + 1, alen + 4, alen - 1, 0xFFFF, rng.randrange(65536)]
                    )
                    b[pos + 2 : pos + 4] = (lie & 0xFFFF).to_bytes(2)
        elif op == 6 and len(b) >= 8:
            b[4:8] = rng.choice([b"\x00" * 4, b"\x21\x12\xa4\x43", rng.randbytes(4)])  # cookie
        elif op == 7:
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.choice([1, 4, 8]))
        elif op == 8 and len(b) > 20:
            i = rng.randrange(20, len(b))
            del b[i : i + rng.choice([1, 4, 8])]
        elif op == 9 and self.recent:
            other = rng.choice(self.recent)  # splice two messages
            b = b[: rng.randrange(len(b) + 1)] + other[rng.randrange(len(other) + 1) :]
        elif op == 10 and b:
            b[0] = rng.choice([0x40, 0x4F, 0x50, 0x80, 0xC0, b[0] | 0x01])
        return bytes(b)

    # -- the mix --

    def sample(self, cred: Cred | None, tcp: bool = False) -> bytes:
        rng = self.rng
        r = rng.random()
        if r < 0.04:
            data = self.garbage()
        elif r < 0.12:
            data = self.channel_data(tcp)
            if rng.random() < 0.3:
                data = self.mutate_bytes(data)
        elif r < 0.14 and self.recent:
            data = rng.choice(self.recent)  # a retransmission, or a replay on another 5-tuple
        elif r < 0.145:
            data = self.giant(cred, tcp)
        else:
            d = self.seed(cred)
            for _ in range(rng.choice([0, 0, 1, 1, 1, 2, 3])):
                self.mutate_draft(d)
            data = self.render(d)
            for _ in range(rng.choice([0, 0, 0, 1, 1, 2])):
                data = self.mutate_bytes(data)
        data = data[: MAX_STUN + 64 if tcp else self.max_size]
        if len(self.recent) < 64:
            self.recent.append(data)
        else:
            self.recent[rng.randrange(64)] = data
        return data

    def valid(self, method: int, cred: Cred, attrs: Callable[[bytes], list[Attr]]) -> bytes:
        """A correctly signed request (its attributes made for its transaction id)."""
        txid = self.txid()
        return self.render(Draft(method, txid, attrs(txid), cred))


def allocate_attrs(txid: bytes) -> list[Attr]:
    return [(REQUESTED_TRANSPORT, bytes((17, 0, 0, 0)))]


def bind_attrs(peer: tuple[str, int]) -> Callable[[bytes], list[Attr]]:
    """ChannelBind of channel 0x4000 to `peer`."""
    return lambda txid: [
        (CHANNEL_NUMBER, b"\x40\x00\x00\x00"),
        (XOR_PEER_ADDRESS, xor_address(*peer, txid)),
    ]


# --- checking answers ------------------------------------------------------------------------


def reply_problem(request: bytes, reply: bytes, keys: list[bytes]) -> str | None:
    """Why `reply` is not a well-formed answer to `request`, or None."""
    if len(reply) < 20 or reply[4:8] != COOKIE_BYTES:
        return "no STUN header"
    mtype, length = struct.unpack_from("!HH", reply)
    if length + 20 != len(reply) or length & 3:
        return "length field does not match"
    if mtype & 0x0110 not in (0x0100, 0x0110):
        return "neither a success nor an error response"
    if reply[8:20] != request[8:20]:
        return "transaction id differs"
    if mtype & 0x3EEF != struct.unpack_from("!H", request)[0] & 0x3EEF:
        return "method differs"
    end = 20
    for pos, _, alen in attributes(reply):
        end = pos + 4 + alen + (-alen & 3)
    if end != len(reply):
        return "attributes do not fill the message"
    if mtype & 0x3EEF not in KNOWN_METHODS:
        return None  # aioice cannot parse an unknown method; the framing was checked
    try:
        message = parse_message(reply)
    except ValueError as exc:
        return f"aioice cannot parse it: {exc}"
    if message.message_class == Class.ERROR and message.error_code is None:
        return "error response without ERROR-CODE"
    if message.message_method == Method.BINDING:
        signed = False
    elif message.message_class == Class.RESPONSE:
        signed = True
    else:
        signed = message.error_code in AUTHENTICATED_ERRORS
    if signed and not any(message.check_message_integrity(k) for k in keys):
        return f"{message.error_code or 'success'} without a valid MESSAGE-INTEGRITY"
    return None


class Failures:
    """Exceptions and bad answers, grouped by what and where, each with its smallest input."""

    def __init__(self) -> None:
        self.smallest: dict[str, bytes] = {}
        self.count: Counter[str] = Counter()

    def add(self, signature: str, data: bytes) -> None:
        self.count[signature] += 1
        if signature not in self.smallest or len(data) < len(self.smallest[signature]):
            self.smallest[signature] = data

    def exception(self, exc: BaseException, data: bytes) -> None:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
        self.add(f"{type(exc).__name__} at {where}: {exc}", data)

    def report(self) -> str:
        lines = [f"fuzz seed {SEED}:"]
        for signature, data in self.smallest.items():
            shown = data.hex() if len(data) <= 160 else data[:160].hex() + "..."
            lines.append(f"  {self.count[signature]}x {signature}\n    {len(data)} bytes: {shown}")
        return "\n".join(lines)

    def __bool__(self) -> bool:
        return bool(self.smallest)


# --- in-process: TurnCore without sockets ----------------------------------------------------


class FakeRelay:
    family = 1
    dropped = 0

    def __init__(self, pool: FakeRelays, port: int) -> None:
        self.pool = pool
        self.address = ("127.0.0.1", port)

    def start(self, on_datagram: Callable[[bytes, tuple[str, int]], None]) -> None:
        pass

    def sendto(self, data: bytes, peer: tuple[str, int]) -> None:
        self.pool.sent += 1

    def close(self) -> None:
        pass


class FakeRelays:
    """A RelayFactory that opens no socket: relayed datagrams are only counted."""

    families = frozenset({1})

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.port = 49152
        self.reserved: dict[bytes, FakeRelay] = {}
        self.sent = 0

    def open(
        self, family: int, *, even_port: bool, reserve_next: bool, dont_fragment: bool
    ) -> tuple[FakeRelay, bytes | None]:
        if family not in self.families:
            raise NoCapacity("family")
        self.port = 49152 + (self.port - 49152 + 2) % 16000
        token = None
        if reserve_next:
            token = self.rng.randbytes(8)
            self.reserved[token] = FakeRelay(self, self.port + 1)
        return FakeRelay(self, self.port), token

    def take_reserved(self, token: bytes) -> FakeRelay | None:
        return self.reserved.pop(token, None)

    def next_deadline(self) -> float | None:
        return None

    def expire(self, now: float) -> None:
        pass


@dataclass
class Harness:
    """A TurnCore with fake relays, and clients on several 5-tuples that hold a nonce."""

    core: TurnCore
    relays: FakeRelays
    clients: list[Client]
    creds: dict[FiveTuple, Cred]
    keys: list[bytes]
    received: list[bytes]  # what the core sent to clients outside answers (relayed data)
    sink: tuple[str, int] = ("127.0.0.1", 9999)

    @classmethod
    def build(cls, rng: random.Random) -> Harness:
        settings = Settings(
            http=False,
            users=((USER, PASSWORD), ("bob", "builder")),
            realm=REALM,
            user_quota=8,
            max_allocations=64,
            max_permissions=16,
        )
        relays = FakeRelays(rng)
        policy = PeerPolicy(allow=(LOOPBACK,), listen_ports={3478})
        core = TurnCore(settings, relays, policy, SECRET, nonces=Nonces(key=b"k" * 32))
        received: list[bytes] = []
        local = ("127.0.0.1", 3478)
        tuples = [("udp", "127.0.0.1"), ("udp", "127.0.0.1"), ("udp", "127.0.0.2")]
        tuples += [("tcp", "127.0.0.1"), ("tls", "127.0.0.3")]
        clients = [
            Client(transport, (ip, 40000 + i), local, received.append)
            for i, (transport, ip) in enumerate(tuples)
        ]
        rest_user = f"{int(NOW) + 86400}:fuzz"  # a TURN REST API user for one of them
        creds = {}
        for i, client in enumerate(clients):
            user, password = (
                (rest_user, rest_password(SECRET, rest_user)) if i == 2 else (USER, PASSWORD)
            )
            nonce = core.nonces.issue(client.remote[0], NOW)
            creds[client.five_tuple] = Cred(
                user, REALM, nonce, long_term_key(user, REALM, password)
            )
        keys = [c.key for c in creds.values()] + [long_term_key("bob", REALM, "builder")]
        return cls(core, relays, clients, creds, keys, received)

    def cred(self, client: Client) -> Cred:
        return self.creds[client.five_tuple]

    def dispatch(self, data: bytes, client: Client, now: float) -> bytes | None:
        """What UdpListener and StreamConnection do with one message."""
        if len(data) >= 4 and 0x40 <= data[0] <= 0x7F:
            allocation = self.core.table.get(client.five_tuple)
            if allocation is not None:
                allocation.from_client_channel(data)
            return None
        return self.core.handle(data, client, now)

    def establish(self, corpus: Corpus, client: Client, now: float) -> None:
        """Give `client` an allocation with channel 0x4000 to the sink, as a real client does."""
        cred = self.cred(client)
        if self.core.table.get(client.five_tuple) is None:
            self.dispatch(corpus.valid(ALLOCATE, cred, allocate_attrs), client, now)
        self.dispatch(corpus.valid(CHANNEL_BIND, cred, bind_attrs(self.sink)), client, now)

    def from_peer(self, client: Client, rng: random.Random) -> None:
        """Inbound relay data for `client`: from a permitted peer or not, on a channel or not."""
        allocation = self.core.table.get(client.five_tuple)
        if allocation is not None:
            peer = rng.choice([self.sink, ("127.0.0.1", rng.randrange(65536)), ("10.0.0.1", 5)])
            allocation.from_peer(rng.randbytes(rng.choice([0, 1, 5, 100])), peer)


def answer_kind(reply: bytes) -> str:
    """'method/class[ code]', e.g. '0x3/0x100' for an Allocate success."""
    mtype = struct.unpack_from("!H", reply)[0]
    code = ""
    for pos, atype, alen in attributes(reply):
        if atype == ERROR_CODE and alen >= 4 and pos + 8 <= len(reply):
            code = f" {reply[pos + 6] * 100 + reply[pos + 7]}"
    method = mtype & 0x3EEF
    return f"{method:#x}/{mtype & 0x0110:#x}{code}" if method in KNOWN_METHODS else f"other{code}"


def fuzz_core(harness: Harness, corpus: Corpus, count: int, failures: Failures) -> Counter[str]:
    """Throw `count` messages at the core; returns how it answered."""
    rng = corpus.rng
    answers: Counter[str] = Counter()
    for i in range(count):
        now = NOW + i * 0.001
        if i % 500 == 0:
            harness.core.handle_timers(now)
            for client in harness.clients:
                harness.establish(corpus, client, now)
        client = rng.choice(harness.clients)
        data = corpus.sample(harness.cred(client), tcp=client.transport != "udp")
        try:
            reply = harness.dispatch(data, client, now)
            if rng.random() < 0.02:
                harness.from_peer(client, rng)
        except Exception as exc:
            failures.exception(exc, data)
            continue
        if reply is None:
            answers["none"] += 1
            continue
        problem = reply_problem(data, reply, harness.keys)
        if problem is not None:
            failures.add(f"bad answer: {problem}", data)
        kind = answer_kind(reply)
        answers[kind] += 1
        if kind == "0x3/0x100":  # learn RESERVATION-TOKENs, to redeem them later
            for pos, atype, alen in attributes(reply):
                if atype == RESERVATION_TOKEN and alen == 8:
                    corpus.tokens.append(reply[pos + 4 : pos + 12])
    return answers


def test_core_survives_mutated_messages(caplog: pytest.LogCaptureFixture) -> None:
    """120k mutated messages through TurnCore.handle(): no exception, only valid answers."""
    log_seed("in-process core")
    caplog.set_level(logging.WARNING, logger="p2pserver")
    rng = random.Random(SEED)
    harness = Harness.build(rng)
    corpus = Corpus(rng, [harness.sink], max_size=MAX_UDP)
    failures = Failures()
    answers = fuzz_core(harness, corpus, 120_000, failures)
    print(f"seeds {dict(corpus.kinds)}")
    print(f"answers {dict(answers.most_common())}")
    print(f"relayed to peers {harness.relays.sent}, to clients {len(harness.received)}")
    assert not failures, failures.report()
    records = [r for r in caplog.records if r.name.startswith("p2pserver")]
    assert not [r for r in records if r.levelno >= logging.ERROR], records[:5]
    # Only meaningful if the corpus gets past authentication into every handler.
    for kind in ("0x1/0x100", "0x3/0x100", "0x4/0x100", "0x8/0x100", "0x9/0x100", "0x3/0x110 401"):
        assert answers[kind] >= 20, (kind, answers)
    assert harness.relays.sent >= 100 and harness.received


ATTRIBUTE_LIST = st.lists(
    st.tuples(
        st.sampled_from(ATTRIBUTE_TYPES) | st.integers(0, 0xFFFF),
        st.binary(max_size=40)
        | st.sampled_from([b"\x00\x01\x33\x12\x5e\x12\xa4\x43", b"\x11\0\0\0"]),
    ),
    max_size=8,
)
_HARNESSES: dict[str, tuple[Harness, Client]] = {}
_TXIDS = itertools.count(1)


def _hypothesis_harness(transport: str) -> tuple[Harness, Client]:
    """One core per transport, with a client that holds an allocation, kept across examples."""
    if transport not in _HARNESSES:
        harness = Harness.build(random.Random(SEED))
        client = next(c for c in harness.clients if c.transport == transport)
        harness.establish(Corpus(random.Random(SEED), [harness.sink], MAX_UDP), client, NOW)
        _HARNESSES[transport] = harness, client
    return _HARNESSES[transport]


@hsettings(
    max_examples=1500,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(METHODS),
    cls=st.sampled_from(CLASSES),
    attrs=ATTRIBUTE_LIST,
    signed=st.booleans(),
    fingerprint=st.booleans(),
    transport=st.sampled_from(["udp", "tcp"]),
)
def test_core_survives_generated_attribute_lists(
    method: int, cls: int, attrs: list[Attr], signed: bool, fingerprint: bool, transport: str
) -> None:
    """Hypothesis-built attribute lists, signed with a valid nonce and key, into handle()."""
    harness, client = _hypothesis_harness(transport)
    cred = harness.cred(client) if signed else None
    txid = next(_TXIDS).to_bytes(12)  # the core answers a reused one from its cache
    draft = Draft(message_type(method, cls), txid, attrs, cred, fingerprint)
    data = Corpus(random.Random(0), [harness.sink], MAX_UDP).render(draft)
    reply = harness.dispatch(data, client, NOW)
    if reply is not None:
        assert reply_problem(data, reply, harness.keys) is None, data.hex()


# --- the framer and parse_send, directly -----------------------------------------------------


def chunks(data: bytes, rng: random.Random) -> Iterator[bytes]:
    pos = 0
    while pos < len(data):
        n = rng.choice([1, 2, 3, 4, 7, 20, 100, 1500, 70000])
        yield data[pos : pos + n]
        pos += n


def model_frames(stream: bytes, channels: bool) -> tuple[list[bytes], bool]:
    """RFC 8656 §12.5 framing, written plainly: (complete frames, whether garbage follows).
    Without `channels` (no allocation yet) ChannelData is garbage too."""
    frames, pos = [], 0
    while len(stream) - pos >= 4:
        first, length = stream[pos], int.from_bytes(stream[pos + 2 : pos + 4])
        if 0x40 <= first <= 0x7F:
            if not channels:
                return frames, True
            size = 4 + length + (-length % 4)
        elif first < 0x40:
            if len(stream) - pos < 8:
                break
            if stream[pos + 4 : pos + 8] != COOKIE_BYTES or length % 4:
                return frames, True
            size = 20 + length
        else:
            return frames, True
        if len(stream) - pos < size:
            break
        frames.append(stream[pos : pos + size])
        pos += size
    return frames, False


# The framer refuses ChannelData until the connection has an allocation (server.py sets it).
STRICT_FRAMER = hasattr(StreamFramer(), "channels_allowed")


def test_framer_fuzz() -> None:
    """StreamFramer.feed() with random chunking of valid and garbage streams yields the frames of
    the plain model, then FramingError exactly when the model finds garbage; nothing else."""
    log_seed("framer")
    rng = random.Random(SEED + 1)
    corpus = Corpus(rng, [("127.0.0.1", 9)], MAX_UDP)
    cred = Cred(USER, REALM, b"0" * 32, b"k" * 16)
    failures = Failures()
    outcomes: Counter[bool] = Counter()
    for _ in range(3000):
        parts = [corpus.sample(cred, tcp=True) for _ in range(rng.randrange(1, 12))]
        if rng.random() < 0.3:
            parts.insert(rng.randrange(len(parts) + 1), corpus.garbage())
        stream = b"".join(parts)
        framer = StreamFramer()
        channels = not STRICT_FRAMER or rng.random() < 0.7
        if STRICT_FRAMER:
            framer.channels_allowed = channels
        expected, garbage = model_frames(stream, channels)
        outcomes[garbage] += 1
        got: list[bytes] = []
        error = False
        try:
            for chunk in chunks(stream, rng):
                got += framer.feed(chunk)
        except FramingError:
            error = True
        except Exception as exc:
            failures.exception(exc, stream)
            continue
        if error != garbage:
            failures.add(f"FramingError {error}, the model says garbage {garbage}", stream)
        elif got != (expected[: len(got)] if error else expected):
            failures.add("the frames differ from the model's", stream)
        elif not error and b"".join(got) + bytes(framer._buffer) != stream:
            failures.add("frames and buffer do not add up to the stream", stream)
    assert not failures, failures.report()
    assert outcomes[True] >= 300 and outcomes[False] >= 300, outcomes


def test_parse_send_fuzz() -> None:
    """datapath.parse_send() on mutated Send indications: None or (peer, payload), never raises."""
    log_seed("parse_send")
    rng = random.Random(SEED + 2)
    corpus = Corpus(rng, [("127.0.0.1", 9), ("::1", 9)], MAX_UDP)
    failures = Failures()
    parsed = 0
    for i in range(30_000):
        if i % 50 == 0:
            data = corpus.giant(None, tcp=rng.random() < 0.5)
        else:
            txid = corpus.txid()
            attrs = [(XOR_PEER_ADDRESS, corpus.peer(txid)), (DATA, corpus.payload())]
            d = Draft(SEND_INDICATION, txid, attrs, None, rng.random() < 0.5)
            for _ in range(rng.choice([0, 1, 1, 2])):
                corpus.mutate_draft(d)
            if rng.random() < 0.9:
                d.mtype = SEND_INDICATION
            data = corpus.render(d)
            if rng.random() < 0.5:
                data = corpus.mutate_bytes(data)
        try:
            result = parse_send(data)
            general = _parse_send_any(data)
        except Exception as exc:
            failures.exception(exc, data)
            continue
        if result != general:  # the fast path for the commonest layout says what the loop does
            failures.add(f"parse_send {result!r} but the general parser {general!r}", data)
        if result is not None:
            parsed += 1
            (ip, port), payload = result
            ipaddress.ip_address(ip)
            if not (0 <= port <= 0xFFFF and isinstance(payload, bytes) and payload in data):
                failures.add("a peer or payload that is not in the message", data)
    assert not failures, failures.report()
    assert parsed >= 1000  # the corpus reaches the success path too


# --- over real sockets -----------------------------------------------------------------------


class Sink(asyncio.DatagramProtocol):
    """The only peer relays may reach: echoes what it gets, so data flows back to clients."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received += 1
        assert self.transport is not None
        self.transport.sendto(data, addr)


def confine_relays(
    server: TurnServer, sink: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutated XOR-PEER-ADDRESSes point anywhere: this server may relay to the sink only, so no
    fuzz leaves for another port or host. (The real policy runs in-process above.) Before the
    first Allocate, which keeps `permits`."""
    policy = server.core.policy
    monkeypatch.setattr(policy, "permits", lambda ip, port: (ip, port) == sink)
    monkeypatch.setattr(policy, "permits_ip", lambda ip: ip == sink[0])


async def expect_binding(client: StunClient, attempts: int = 3) -> None:
    """A Binding request gets a success with the client's own address. Over UDP it is
    retransmitted, as any STUN client would, in case a full socket buffer dropped it."""
    request = TurnMessage(Method.BINDING, Class.REQUEST)
    response = None
    for _ in range(1 if client.tcp else attempts):
        with contextlib.suppress(TimeoutError):
            response = await client.transact_raw(bytes(request), request.transaction_id)
            break
    transport = "tcp" if client.tcp else "udp"
    assert response is not None, f"no answer to Binding over {transport}"
    assert response.message_class == Class.RESPONSE, response
    assert response.attributes["XOR-MAPPED-ADDRESS"] == client.local, response
    client.pending.clear()


def drain(client: StunClient, failures: Failures) -> int:
    """Empty a fuzzing client's queue, checking that what the server sent is well-formed."""
    n = 0
    queue = client.protocol.queue
    while not queue.empty():
        data = queue.get_nowait()
        n += 1
        if 0x40 <= data[0] <= 0x7F:
            if len(data) < 4 or int.from_bytes(data[2:4]) > len(data) - 4:
                failures.add("bad ChannelData to a client", data)
        elif (
            len(data) < 20
            or data[4:8] != COOKIE_BYTES
            or int.from_bytes(data[2:4]) + 20 != len(data)
        ):
            failures.add("bad STUN message to a client", data)
    client.pending.clear()
    return n


async def reestablish(server: TurnServer, client: StunClient, sink: tuple[str, int]) -> None:
    """Fuzzed Refreshes delete allocations: give the client its allocation and channel back."""
    five_tuple = ("udp", client.local, ("127.0.0.1", server.port))
    if server.core.table.get(five_tuple) is None:
        await client.allocate()
    await client.request(Method.CHANNEL_BIND, {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": sink})


def whole_frames(corpus: Corpus, cred: Cred, count: int, channel_data: bool) -> list[bytes]:
    """Mutated messages that still frame on their own, so that the stream stays in step."""
    frames: list[bytes] = []
    for _ in range(count * 20):
        if len(frames) == count:
            break
        data = corpus.sample(cred, tcp=True)
        alone, garbage = model_frames(data, channels=True)
        if not garbage and alone == [data] and (channel_data or not 0x40 <= data[0] <= 0x7F):
            frames.append(data)
    return frames


def expected_outcome(stream: bytes, binding: bytes) -> str:
    """What the server's framer makes of `stream`, which ends with a Binding request. The framer
    lets ChannelData through only while the connection has an allocation, decided per received
    chunk; framing with and without ChannelData bounds what it can do."""
    strict_garbage = model_frames(stream, channels=not STRICT_FRAMER)[1]
    lenient, lenient_garbage = model_frames(stream, channels=True)
    answered = bool(lenient) and lenient[-1] == binding
    if lenient_garbage:
        return "garbage"  # the server closes the connection, wherever its framer trips
    if not answered:
        return "swallowed"  # the Binding completes a frame some lying length began
    return "answered or closed" if strict_garbage else "answered"


async def stun_answer(
    reader: asyncio.StreamReader, framer: StreamFramer, txid: bytes
) -> bytes | None:
    """Read until the answer to `txid`; None if the server closes the connection first."""
    while data := await reader.read(65536):
        for frame in framer.feed(data):
            if frame[0] < 0x40 and frame[8:20] == txid:
                return frame
    return None


async def tcp_stream(
    address: tuple[str, int], corpus: Corpus, cred: Cred, sink: tuple[str, int], failures: Failures
) -> str:
    """One TCP connection: mutated frames in random chunks, then a Binding request. Garbage must
    close the connection; otherwise the Binding is answered. "clean" streams keep their framing
    intact; "allocated" ones first get an allocation and a channel and then send ChannelData too;
    "raw" ones are anything the corpus makes."""
    rng = corpus.rng
    style = rng.choices(["clean", "allocated", "raw"], weights=[4, 3, 3])[0]
    count = rng.randrange(1, 30)
    preface = [corpus.valid(ALLOCATE, cred, allocate_attrs)]
    preface.append(corpus.valid(CHANNEL_BIND, cred, bind_attrs(sink)))
    if style == "raw":
        frames = [corpus.sample(cred, tcp=True) for _ in range(count)]
        if rng.random() < 0.5:
            frames[:0] = preface  # pipelined, not waited for
    else:
        frames = whole_frames(corpus, cred, count, channel_data=style == "allocated")
    binding = TurnMessage(Method.BINDING, Class.REQUEST, corpus.txid())
    stream = b"".join(frames) + bytes(binding)
    outcome = expected_outcome(stream, bytes(binding))
    reader, writer = await asyncio.open_connection(*address)
    local = writer.get_extra_info("sockname")[:2]
    framer = StreamFramer()
    framer.channels_allowed = True  # the server may send ChannelData from the sink's echoes
    try:
        async with asyncio.timeout(10):
            if style == "allocated":
                writer.write(b"".join(preface))
                assert await stun_answer(reader, framer, preface[-1][8:20]), "no ChannelBind answer"
            for chunk in chunks(stream, rng):
                writer.write(chunk)
                await writer.drain()
            if outcome.startswith("answered"):
                answer = await stun_answer(reader, framer, binding.transaction_id)
                if answer is None:
                    assert outcome == "answered or closed", "closed, but no garbage was sent"
                    outcome = "closed"
                else:
                    response = parse_message(answer)
                    assert response.message_class == Class.RESPONSE, response
                    assert response.attributes["XOR-MAPPED-ADDRESS"] == local, response
            elif outcome == "garbage":
                while await reader.read(65536):
                    pass  # answers to the frames before the garbage, then the server closes
    except ConnectionError:
        if outcome not in ("garbage", "answered or closed"):
            failures.add(f"{style}/{outcome}: connection reset, but no garbage was sent", stream)
    except FramingError:
        failures.add(f"{style}/{outcome}: the server sent a broken TCP stream", stream)
    except (TimeoutError, AssertionError) as exc:
        failures.add(f"{style}/{outcome}: {type(exc).__name__} {exc}", stream)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return f"{style}/{outcome}"


UDP_DATAGRAMS = 20_000
UDP_BATCH = 40  # datagrams between two Binding probes: well inside the socket buffer
TCP_STREAMS = 300
TCP_PARALLEL = 6


@pytest.mark.both_loops
async def test_server_survives_fuzz_over_sockets(
    make_server: Callable, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20k UDP datagrams and 300 TCP streams at a running server: no handler fails, Binding
    keeps working over UDP and TCP, and the log gets only rate-limited lines."""
    log_seed("sockets")
    caplog.set_level(logging.WARNING, logger="p2pserver")
    started = time.monotonic()
    rng = random.Random(SEED + 3)
    loop = asyncio.get_running_loop()
    sink_transport, sink = await loop.create_datagram_endpoint(Sink, local_addr=("127.0.0.1", 0))
    sink_address = sink_transport.get_extra_info("sockname")[:2]
    server: TurnServer = await make_server(allow_peers=(LOOPBACK,))
    confine_relays(server, sink_address, monkeypatch)
    address = ("127.0.0.1", server.port)
    failures = Failures()
    clients: list[StunClient] = []
    outcomes: Counter[str] = Counter()
    answers = 0
    try:
        probe_udp = await StunClient.connect(address)
        probe_tcp = await StunClient.connect(address, "tcp")
        clients += [probe_udp, probe_tcp]
        await expect_binding(probe_udp)
        await expect_binding(probe_tcp)
        fuzzers = [await StunClient.connect(address) for _ in range(4)]
        clients += fuzzers
        for client in fuzzers:
            await client.login(USER, PASSWORD)
            await reestablish(server, client, sink_address)
        c = fuzzers[0]
        assert c.username and c.realm and c.nonce and c.key
        cred = Cred(c.username, c.realm, c.nonce, c.key)  # the nonce is good for 127.0.0.1
        corpus = Corpus(rng, [sink_address], max_size=MAX_UDP)

        for batch in range(UDP_DATAGRAMS // UDP_BATCH):
            for _ in range(UDP_BATCH):
                rng.choice(fuzzers).send_raw(corpus.sample(cred))
            await expect_binding(probe_udp)
            if batch % 25 == 0:
                await expect_binding(probe_tcp)
                for client in fuzzers:
                    answers += drain(client, failures)
                    await reestablish(server, client, sink_address)

        for first in range(0, TCP_STREAMS, TCP_PARALLEL):
            group = [
                tcp_stream(address, corpus, cred, sink_address, failures)
                for _ in range(TCP_PARALLEL)
            ]
            outcomes.update(await asyncio.gather(*group))
            if first % 60 == 0:
                await expect_binding(probe_udp)
                await expect_binding(probe_tcp)

        # After the flood: the old probes and new clients get answers.
        await expect_binding(probe_udp)
        await expect_binding(probe_tcp)
        for transport in ("udp", "tcp"):
            fresh = await StunClient.connect(address, transport)
            clients.append(fresh)
            await expect_binding(fresh)
    finally:
        for client in clients:
            client.close()
        sink_transport.close()

    elapsed = time.monotonic() - started
    stats = server.stats()
    print(f"UDP fuzz answers {answers}, TCP streams {dict(outcomes)}, sink got {sink.received}")
    print(f"stats {stats}, seeds {dict(corpus.kinds)}, {elapsed:.1f} s")
    assert not failures, failures.report()
    assert stats["faults"] == 0, stats
    records = [r for r in caplog.records if r.name.startswith("p2pserver")]
    errors = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    assert not errors, errors[:5]
    # RateLimitedLog: one line per kind of trouble per interval, however much garbage came.
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) <= 2 * (int(elapsed / server.ratelog.interval) + 1), warnings
    assert outcomes["clean/answered"] >= 50 and outcomes["raw/garbage"] >= 10, outcomes
    assert sink.received > 0  # fuzzed ChannelData and Send indications did reach the relay


# --- regressions: minimal reproductions of what the fuzzers found -----------------------------


def test_signed_send_request_is_refused() -> None:
    """A Send *request* (type 0x0006) is no TURN request: it must get 400. stun.decode() lets
    it through (it only refuses methods other than the requests and Send), so a signed one from
    a client with an allocation reaches the per-method handler table and raises KeyError."""
    harness = Harness.build(random.Random(SEED))
    client = harness.clients[0]
    corpus = Corpus(random.Random(SEED), [], MAX_UDP)
    harness.establish(corpus, client, NOW)
    assert harness.core.table.get(client.five_tuple) is not None
    data = corpus.valid(0x0006, harness.cred(client), lambda t: [])
    reply = harness.core.handle(data, client, NOW)
    assert reply is not None
    assert parse_message(reply).error_code == 400


def largest_send_indication(peer: tuple[str, int]) -> bytes:
    """65552 bytes (TCP only) ending in a FINGERPRINT header without a value."""
    txid = b"\x01" * 12
    xpeer = xor_address(*peer, txid)
    fill = 65532 - (4 + len(xpeer)) - 4 - 4
    data = encode(
        SEND_INDICATION, txid, [(XOR_PEER_ADDRESS, xpeer), (DATA, bytes(fill)), (FINGERPRINT, b"")]
    )
    assert len(data) == MAX_STUN
    return data


def test_parse_send_largest_message_with_empty_fingerprint() -> None:
    """parse_send must return None, not raise OverflowError packing the length 65536."""
    assert parse_send(largest_send_indication(("127.0.0.1", 9))) is None


def test_largest_send_indication_over_tcp_is_dropped() -> None:
    """The same message from a TCP client with an allocation, through TurnCore.handle():
    dropped, not an internal error."""
    harness = Harness.build(random.Random(SEED))
    client = next(c for c in harness.clients if c.transport == "tcp")
    harness.establish(Corpus(random.Random(SEED), [], MAX_UDP), client, NOW)
    assert harness.core.table.get(client.five_tuple) is not None
    assert harness.core.handle(largest_send_indication(harness.sink), client, NOW) is None


def test_reused_transaction_id_is_answered_with_its_own_method() -> None:
    """The retransmission cache is keyed by 5-tuple and transaction id only: a Refresh that
    reuses an Allocate's transaction id gets the cached *Allocate* success (0x0103), which a
    client matching on transaction id takes as its Refresh succeeding."""
    harness = Harness.build(random.Random(SEED))
    client = harness.clients[0]
    cred = harness.cred(client)
    corpus = Corpus(random.Random(SEED), [], MAX_UDP)
    txid = b"\x05" * 12
    allocate = corpus.render(Draft(ALLOCATE, txid, allocate_attrs(txid), cred))
    first = harness.core.handle(allocate, client, NOW)
    assert first is not None and answer_kind(first) == "0x3/0x100"
    refresh = corpus.render(Draft(REFRESH, txid, [(LIFETIME, bytes(4))], cred))
    reply = harness.core.handle(refresh, client, NOW + 1)
    assert reply is not None
    assert answer_kind(reply).startswith("0x4/"), answer_kind(reply)


@pytest.mark.both_loops
async def test_tcp_client_that_never_reads_cannot_grow_server_memory(server: TurnServer) -> None:
    """A TCP client that sends requests and never reads the answers: StreamConnection writes
    every reply with transport.write(), past TCP_MAX_BUFFERED and without pausing reading, so
    the server buffers ~4 bytes of answer (a 401 challenge) per byte received, without bound."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", server.port))
    request = TurnMessage(Method.ALLOCATE, Class.REQUEST, b"\x01" * 12)
    request.attributes["REQUESTED-TRANSPORT"] = 0x11000000
    one = bytes(request)
    # 60k requests, 1.7 MB: their answers would fill 6.7 MB. Sent with plain send() so that
    # what went out is known to the byte; a server that stops reading (TCP backpressure)
    # leaves the socket unwritable, which ends the sending.
    data = memoryview(one * 60_000)
    sent = 0
    try:
        deadline = time.monotonic() + 30
        while not server.connections:  # accepted on the server's side
            assert time.monotonic() < deadline, "the server never accepted the connection"
            await asyncio.sleep(0.01)
        (connection,) = server.connections
        assert connection.transport is not None
        while sent < len(data):
            try:
                sent += sock.send(data[sent : sent + 65536])
            except BlockingIOError:
                if not await writable(sock, 2.0):
                    break
        complete = sent // len(one)

        # The event itself: the server has read every whole request sent, or has stopped
        # reading (paused) with the rest still in the socket.
        def settled() -> bool:
            transport = connection.transport
            return server.stats()["requests"] >= complete or (
                transport is not None and not transport.is_reading()
            )

        deadline = time.monotonic() + 60
        while not settled():
            assert time.monotonic() < deadline, (server.stats()["requests"], complete)
            await asyncio.sleep(0.05)
        buffered = connection.transport.get_write_buffer_size()
        assert buffered <= TCP_MAX_BUFFERED + 4096, (buffered, server.stats()["requests"])
    finally:
        sock.close()


async def writable(sock: socket.socket, timeout: float) -> bool:
    """Whether `sock` becomes writable within `timeout` seconds."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_writer(sock.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await asyncio.wait_for(ready, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_writer(sock.fileno())
