"""A raw STUN/TURN test client over UDP or TCP: sends exactly the bytes a test builds."""

from __future__ import annotations

import asyncio
import hashlib
import struct
from typing import Any

from aioice.stun import Class, Method

from p2pserver.turn.framing import StreamFramer
from p2pserver.turn.stun import TurnMessage as Message
from p2pserver.turn.stun import parse_message

TIMEOUT = 5.0


def key_for(username: str, realm: str, password: str) -> bytes:
    return hashlib.md5(f"{username}:{realm}:{password}".encode()).digest()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(data)


class _Tcp(asyncio.Protocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.framer = StreamFramer()
        self.framer.channels_allowed = True
        self.closed = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        for frame in self.framer.feed(data):
            self.queue.put_nowait(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()


class StunClient:
    """One 5-tuple to the server. `request()` signs with the long-term key once it has one."""

    def __init__(self, transport: asyncio.BaseTransport, protocol: _Udp | _Tcp, tcp: bool):
        self.transport = transport
        self.protocol = protocol
        self.tcp = tcp
        self.username: str | None = None
        self.realm: str | None = None
        self.nonce: bytes | None = None
        self.key: bytes | None = None
        self.pending: list[bytes] = []  # messages that arrived while waiting for a response

    @classmethod
    async def connect(cls, server: tuple[str, int], transport: str = "udp") -> StunClient:
        loop = asyncio.get_running_loop()
        if transport == "udp":
            t, p = await loop.create_datagram_endpoint(_Udp, remote_addr=server)
            return cls(t, p, False)
        t2, p2 = await loop.create_connection(_Tcp, *server)
        return cls(t2, p2, True)

    @property
    def local(self) -> tuple[str, int]:
        return self.transport.get_extra_info("sockname")[:2]

    def send_raw(self, data: bytes) -> None:
        if self.tcp:
            self.transport.write(data)  # type: ignore[attr-defined]
        else:
            self.transport.sendto(data)  # type: ignore[attr-defined]

    async def receive(self, timeout: float = TIMEOUT) -> bytes:
        if self.pending:
            return self.pending.pop(0)
        return await asyncio.wait_for(self.protocol.queue.get(), timeout)

    async def nothing_within(self, seconds: float) -> bool:
        """True when no message arrives within `seconds` (used only for 'must be dropped')."""
        try:
            data = await self.receive(seconds)
        except TimeoutError:
            return True
        self.pending.insert(0, data)
        return False

    async def transact_raw(self, data: bytes, transaction_id: bytes) -> Message:
        self.send_raw(data)
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while True:
            left = deadline - asyncio.get_running_loop().time()
            raw = await asyncio.wait_for(self.protocol.queue.get(), max(left, 0.01))
            if raw[0] & 0xC0 == 0 and raw[8:20] == transaction_id:
                message = parse_message(raw)
                message.raw = raw  # type: ignore[attr-defined]
                return message
            self.pending.append(raw)

    async def request(
        self,
        method: Method,
        attributes: dict[str, Any] | None = None,
        *,
        sign: bool = True,
        fingerprint: bool = False,
        transaction_id: bytes | None = None,
    ) -> Message:
        message = Message(method, Class.REQUEST, transaction_id, dict(attributes or {}))
        if sign and self.key is not None:
            message.attributes["USERNAME"] = self.username
            message.attributes["REALM"] = self.realm
            message.attributes["NONCE"] = self.nonce
            message.add_message_integrity(self.key)
            if not fingerprint:
                del message.attributes["FINGERPRINT"]
        elif fingerprint:
            message.add_fingerprint()
        return await self.transact_raw(bytes(message), message.transaction_id)

    async def login(self, username: str, password: str) -> Message:
        """Allocate-free: learn REALM and NONCE from a 401, then keep the key."""
        challenge = await self.request(
            Method.ALLOCATE, {"REQUESTED-TRANSPORT": 0x11000000}, sign=False
        )
        assert challenge.error_code == 401, challenge
        self.username = username
        self.realm = challenge.attributes["REALM"]
        self.nonce = challenge.attributes["NONCE"]
        self.key = key_for(username, self.realm, password)
        return challenge

    async def allocate(self, **attributes: Any) -> Message:
        attrs: dict[str, Any] = {"REQUESTED-TRANSPORT": 0x11000000}
        attrs.update({k.replace("_", "-").upper(): v for k, v in attributes.items()})
        return await self.request(Method.ALLOCATE, attrs)

    def send_channel_data(self, channel: int, payload: bytes) -> None:
        data = struct.pack("!HH", channel, len(payload)) + payload
        if self.tcp and len(payload) % 4:
            data += bytes(4 - len(payload) % 4)
        self.send_raw(data)

    def close(self) -> None:
        self.transport.close()
