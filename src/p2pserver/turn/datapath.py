"""The data path, by hand with struct: ChannelData (RFC 8656 §12.4) and Send/Data indications
(RFC 8656 §11). No aioice here: it costs 10-15 us a message, these cost under half of one
(bench/turn_relay.py, the datapath rows)."""

from __future__ import annotations

import binascii
import os
import socket
import struct

from p2pserver.turn.stun import (
    COOKIE,
    DATA,
    FINGERPRINT,
    FINGERPRINT_XOR,
    KNOWN_TYPES,
    SEND_INDICATION,
    XOR_PEER_ADDRESS,
    pack_xor_address,
)
from p2pserver.turn.stun import COOKIE_BYTES as _COOKIE_BYTES

_SEND_TYPE = int.from_bytes(SEND_INDICATION)
_DATA_INDICATION = b"\x00\x17"
_HDR = struct.Struct("!HH")
_FINGERPRINT_HEAD = _HDR.pack(FINGERPRINT, 4)


# The first bytes of ChannelData: channels 0x4000-0x7FFF (is_channel). A set, so the hot paths
# test membership without a call: 25 ns, where a range takes 55 (it computes a remainder).
CHANNEL_FIRST_BYTES = frozenset(range(0x40, 0x80))


def is_channel(first_byte: int) -> bool:
    """Whether a message whose first byte is `first_byte` is ChannelData, and (applied to
    `number >> 8`) whether a channel number may be bound: 0x4000-0x7FFF.

    RFC 8656 §12 narrowed channels to 0x4000-0x4FFF, but RFC 5766 §11 allowed 0x4000-0x7FFF and
    its clients (coturn's turnutils_uclient among them) still pick from the whole range; coturn
    and pion accept it, so this server does too (docs/turn.md, "Channel numbers"). STUN's first
    byte is 0x00-0x3F, so the two never overlap. ChannelBind asks this; the UDP listener and the
    TCP framer test CHANNEL_FIRST_BYTES, the same rule, without the call."""
    return first_byte in CHANNEL_FIRST_BYTES


def channel_data(channel: int, payload: bytes, pad: bool) -> bytes:
    """A ChannelData message; over TCP and TLS padded to 4 bytes (RFC 8656 §12.5)."""
    head = _HDR.pack(channel, len(payload))
    if pad and len(payload) & 3:
        return head + payload + bytes(-len(payload) & 3)
    return head + payload


# Transaction ids, cryptographically random as RFC 8489 §6 requires, drawn 256 at a time: one
# os.urandom call per datagram was a quarter of a Data indication's cost.
_TXIDS = 256
_txid_pool = b""
_txid_next = _TXIDS


def _forget_txids() -> None:
    global _txid_next
    _txid_next = _TXIDS  # a forked process draws its own: no id shared with its parent


os.register_at_fork(after_in_child=_forget_txids)


def _txid() -> bytes:
    """The next id of the pool: for the event loop's thread only (it counts without a lock)."""
    global _txid_pool, _txid_next
    if _txid_next >= _TXIDS:
        _txid_pool, _txid_next = os.urandom(12 * _TXIDS), 0
    start = 12 * _txid_next
    _txid_next += 1
    return _txid_pool[start : start + 12]


# An IPv4 peer's XOR-PEER-ADDRESS attribute does not depend on the transaction id (RFC 8489
# §14.2: only IPv6 XORs with it), and a relay's peers are few: kept, up to _CACHED of them.
_CACHED = 4096
_v4_peer_attrs: dict[tuple[str, int], bytes] = {}


def _peer_attr(peer: tuple[str, int], txid: bytes) -> bytes:
    attr = _v4_peer_attrs.get(peer)
    if attr is None:
        xaddr = pack_xor_address(peer, txid)
        attr = _HDR.pack(XOR_PEER_ADDRESS, len(xaddr)) + xaddr
        if len(xaddr) == 8:  # IPv4
            if len(_v4_peer_attrs) >= _CACHED:
                _v4_peer_attrs.clear()
            _v4_peer_attrs[peer] = attr
    return attr


def data_indication(peer: tuple[str, int], payload: bytes) -> bytes:
    """A Data indication carrying a datagram from `peer` (RFC 8656 §11.6)."""
    txid = _txid()
    peer_attr = _peer_attr(peer, txid)
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
            _HDR.pack(DATA, size),
            payload,
            bytes(pad),
        )
    )


# The commonest Send indication (browsers'): XOR-PEER-ADDRESS of an IPv4 peer, then DATA.
_SEND_V4 = struct.Struct("!HH4s12xHHxBH4sHH")  # through DATA's header, 36 bytes
_v4_ips: dict[bytes, str] = {}  # XOR-ed address -> the IP (see _CACHED)


def parse_send(data: bytes) -> tuple[tuple[str, int], bytes] | None:
    """(peer, payload) of a valid Send indication, else None: RFC 8656 §11.2 says drop, never
    answer, an indication that is wrong."""
    if len(data) >= 36:  # the commonest shape first, in one unpack; anything else below
        mtype, length, cookie, atype, alen, family, xport, xip, dtype, dlen = _SEND_V4.unpack_from(
            data
        )
        end = 36 + dlen + (-dlen & 3)
        if (
            mtype == _SEND_TYPE
            and cookie == _COOKIE_BYTES
            and atype == XOR_PEER_ADDRESS
            and alen == 8
            and family == 1
            and dtype == DATA
            and length + 20 == len(data)
            and (end == len(data) or (end + 8 == len(data) and _fingerprint_ok(data, end)))
        ):
            ip = _v4_ips.get(xip)
            if ip is None:
                ip = socket.inet_ntoa((int.from_bytes(xip) ^ COOKIE).to_bytes(4))
                if len(_v4_ips) >= _CACHED:
                    _v4_ips.clear()
                _v4_ips[xip] = ip
            return (ip, xport ^ 0x2112), data[36 : 36 + dlen]
    return _parse_send_any(data)


def _parse_send_any(data: bytes) -> tuple[tuple[str, int], bytes] | None:
    """parse_send for any layout: attributes in any order, IPv6, unknown optional ones."""
    if len(data) < 20 or data[4:8] != _COOKIE_BYTES:
        return None
    mtype, length = _HDR.unpack_from(data)
    if mtype != _SEND_TYPE or length + 20 != len(data) or length & 3:
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
        if atype == XOR_PEER_ADDRESS and peer is None:
            peer = _xor_address(data[vstart:vend], data[8:20])
            if peer is None:
                return None
        elif atype == DATA and payload is None:
            payload = data[vstart:vend]
        elif atype == FINGERPRINT:
            if alen != 4 or vend != end or not _fingerprint_ok(data, pos):
                return None
        elif atype < 0x8000 and atype not in KNOWN_TYPES:
            return None  # unknown comprehension-required: discard (RFC 8489 §7.3.2)
        pos = vend + (-alen & 3)
    if pos != end or peer is None or payload is None:
        return None
    return peer, payload


def _fingerprint_ok(data: bytes, pos: int) -> bool:
    """Whether `data` ends, at `pos`, in a FINGERPRINT attribute (8 bytes) that matches what
    comes before it (RFC 8489 §14.7). The callers checked that the header's length reaches the
    end, so it already counts the FINGERPRINT, as the CRC wants."""
    if data[pos : pos + 4] != _FINGERPRINT_HEAD:
        return False
    return int.from_bytes(data[pos + 4 : pos + 8]) == binascii.crc32(data[:pos]) ^ FINGERPRINT_XOR


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
