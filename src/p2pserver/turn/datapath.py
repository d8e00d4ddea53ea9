"""The data path, by hand with struct: ChannelData (RFC 8656 §12.4) and Send/Data indications
(RFC 8656 §11). No aioice here: it costs 10-15 us a message, these cost about 1 us."""

from __future__ import annotations

import binascii
import os
import socket
import struct

from p2pserver.turn.stun import COOKIE, KNOWN_TYPES, pack_xor_address
from p2pserver.turn.stun import COOKIE_BYTES as _COOKIE_BYTES

_SEND_INDICATION = 0x0016
_DATA_INDICATION = b"\x00\x17"
_XOR_PEER_ADDRESS = 0x0012
_DATA = 0x0013
_FINGERPRINT = 0x8028
_HDR = struct.Struct("!HH")


# The first bytes of ChannelData: channels 0x4000-0x7FFF (is_channel). A set, so the hot paths
# test membership without a call: 25 ns, where a range takes 55 (it computes a remainder).
CHANNEL_FIRST_BYTES = frozenset(range(0x40, 0x80))


def is_channel(first_byte: int) -> bool:
    """Whether a message whose first byte is `first_byte` is ChannelData, and (applied to
    `number >> 8`) whether a channel number may be bound: 0x4000-0x7FFF.

    RFC 8656 §12 narrowed channels to 0x4000-0x4FFF, but RFC 5766 §11 allowed 0x4000-0x7FFF and
    its clients (coturn's turnutils_uclient among them) still pick from the whole range; coturn
    and pion accept it, so this server does too (docs/turn.md, "Channel numbers"). STUN's first
    byte is 0x00-0x3F, so the two never overlap. The one rule for ChannelBind, the UDP listener
    and the TCP framer."""
    return first_byte in CHANNEL_FIRST_BYTES


def channel_data(channel: int, payload: bytes, pad: bool) -> bytes:
    """A ChannelData message; over TCP and TLS padded to 4 bytes (RFC 8656 §12.5)."""
    head = _HDR.pack(channel, len(payload))
    if pad and len(payload) & 3:
        return head + payload + bytes(-len(payload) & 3)
    return head + payload


def data_indication(peer: tuple[str, int], payload: bytes) -> bytes:
    """A Data indication carrying a datagram from `peer` (RFC 8656 §11.6)."""
    txid = os.urandom(12)
    xaddr = pack_xor_address(peer, txid)
    peer_attr = _HDR.pack(_XOR_PEER_ADDRESS, len(xaddr)) + xaddr
    size = len(payload)
    pad = -size & 3
    body_len = len(peer_attr) + 4 + size + pad
    return b"".join(
        (
            _DATA_INDICATION,
            body_len.to_bytes(2),
            _COOKIE_BYTES,
            txid,
            peer_attr,
            _HDR.pack(_DATA, size),
            payload,
            bytes(pad),
        )
    )


def parse_send(data: bytes) -> tuple[tuple[str, int], bytes] | None:
    """(peer, payload) of a valid Send indication, else None: RFC 8656 §11.2 says drop, never
    answer, an indication that is wrong."""
    if len(data) < 20 or data[4:8] != _COOKIE_BYTES:
        return None
    mtype, length = _HDR.unpack_from(data)
    if mtype != _SEND_INDICATION or length + 20 != len(data) or length & 3:
        return None
    peer: tuple[str, int] | None = None
    payload: bytes | None = None
    pos = 20
    end = len(data)
    while pos + 4 <= end:
        atype, alen = _HDR.unpack_from(data, pos)
        vstart = pos + 4
        vend = vstart + alen
        if vend > end:
            return None
        if atype == _XOR_PEER_ADDRESS and peer is None:
            peer = _xor_address(data[vstart:vend], data[8:20])
            if peer is None:
                return None
        elif atype == _DATA and payload is None:
            payload = data[vstart:vend]
        elif atype == _FINGERPRINT:
            if alen != 4 or vend != end:
                return None
            check = data[:2] + (pos + 8 - 20).to_bytes(2) + data[4:pos]
            if int.from_bytes(data[vstart:vend]) != binascii.crc32(check) ^ 0x5354554E:
                return None
        elif atype < 0x8000 and atype not in KNOWN_TYPES:
            return None  # unknown comprehension-required: discard (RFC 8489 §7.3.2)
        pos = vend + (-alen & 3)
    if pos != end or peer is None or payload is None:
        return None
    return peer, payload


def _xor_address(value: bytes, txid: bytes) -> tuple[str, int] | None:
    if len(value) == 8 and value[1] == 1:
        xip = int.from_bytes(value[4:8]) ^ COOKIE
        return socket.inet_ntoa(xip.to_bytes(4)), int.from_bytes(value[2:4]) ^ 0x2112
    if len(value) == 20 and value[1] == 2:
        xip = int.from_bytes(value[4:20]) ^ int.from_bytes(_COOKIE_BYTES + txid)
        return socket.inet_ntop(socket.AF_INET6, xip.to_bytes(16)), int.from_bytes(
            value[2:4]
        ) ^ 0x2112
    return None
