"""TURN over TCP and TLS: cut STUN messages and ChannelData out of a byte stream (RFC 8656 §12.5).

A STUN message is 20 bytes of header plus its length; ChannelData is 4 bytes plus its length,
padded to a multiple of 4. Anything else means the peer is not speaking TURN: the connection is
closed, which affects nobody else.
"""

from __future__ import annotations

import struct

from p2pserver.turn.datapath import CHANNEL_FIRST_BYTES

_COOKIE = b"\x21\x12\xa4\x42"
_U16 = struct.Struct("!H")


class FramingError(ValueError):
    pass


class StreamFramer:
    def __init__(self) -> None:
        self._buffer = bytearray()
        # ChannelData before an allocation exists is garbage; "GET /" looks like channel 0x4745.
        self.channels_allowed = False

    def __len__(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Append `data`; return every complete frame. Raises FramingError on garbage."""
        buf = self._buffer
        buf += data
        frames: list[bytes] = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            first = buf[pos]
            length = _U16.unpack_from(buf, pos + 2)[0]
            if first in CHANNEL_FIRST_BYTES:
                if not self.channels_allowed:
                    raise FramingError("ChannelData before any allocation")
                size = 4 + length + (-length & 3)
            elif first & 0xC0 == 0:
                if end - pos < 8:
                    break
                if buf[pos + 4 : pos + 8] != _COOKIE or length & 3:
                    raise FramingError("not a STUN message")
                size = 20 + length
            else:
                raise FramingError("neither STUN nor ChannelData")
            if end - pos < size:
                break
            frames.append(bytes(buf[pos : pos + size]))
            pos += size
        if pos:
            del buf[:pos]
        return frames
