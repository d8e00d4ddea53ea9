"""uvicorn's sans-I/O WebSocket protocol, plus a synchronous lane for joined signaling peers.

Through ASGI every frame costs two task hops: uvicorn queues it for the app's `receive()`, and
the app's reply waits for the recipient's writer task. A relayed signal needs neither: handling
it never waits for anything. So the connection offers the app a `Lane` (in the ASGI scope's
extensions, under LANE): once the app sets a frame handler, frames go straight from
`data_received` to it, and `Lane.send` writes a frame to the socket at once. Once detached, the
app's ASGI call returns and the connection lives on with no task at all: the lane closes it and
the protocol reports its loss. The handshake and the join go through ASGI as usual.
docs/architecture.md has the measurements behind this choice.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import Protocol, State

LANE = "p2pserver.lane"  # the scope["extensions"] key

FrameHandler = Callable[[str | None, bytes | None], None]  # (text, None) or (None, data)


class Lane:
    """What the app may do on a connection without ASGI: take frames, send text frames, and
    (detach) let the ASGI call return while the connection stays open."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: SignalingWebSocketProtocol) -> None:
        self._protocol = protocol

    def set_handler(self, handler: FrameHandler | None) -> None:
        """Give frames to `handler` as they arrive (None: back to the ASGI queue)."""
        self._protocol.frame_handler = handler

    def detach(self, on_lost: Callable[[], None]) -> bool:
        """Let the app's ASGI call return without closing the connection.

        Only with a handler set and nothing queued for ASGI (else False: read on). From then
        on the handler gets every frame, `on_lost` is called once when the connection is gone,
        and the hub closes the connection through `Lane.close`.
        """
        protocol = self._protocol
        if protocol.frame_handler is None or not protocol.queue.empty() or protocol.disconnected:
            return False
        protocol.on_lost = on_lost
        return True

    def send(self, text: str) -> bool:
        """Write one text frame now; False if the connection is closing or gone."""
        return self._protocol.send_now(text)

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake now (RFC 6455 §7.1.2), as an ASGI close would."""
        self._protocol.close_now(code, reason)

    def closed_cleanly(self) -> bool:
        """A close frame went either way: the connection was closed, not lost (RFC 6455
        §7.1.5: without one the close code is 1006)."""
        conn = self._protocol.conn
        return conn.close_rcvd is not None or conn.close_sent is not None

    def buffered(self) -> int:
        """Bytes sent but not yet taken by the kernel (what a slow reader piles up)."""
        protocol = self._protocol
        return protocol.transport.get_write_buffer_size() + protocol.pending_bytes


# Frames sent while some connection's data_received runs wait in their connection's `pending`
# until it returns, so the signals one read brings for one peer leave in one write (one system
# call) instead of one each. Outside data_received (a join, a disconnect) frames go at once.
_batch: list[SignalingWebSocketProtocol] | None = None


class Inbox:
    """asyncio.Queue as uvicorn uses it (put_nowait, get, empty; one reader) in less memory.

    An idle peer's queue is empty for hours: asyncio.Queue's three deques and Event cost about
    3 KB per connection, a list and an optional future a tenth of that.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)


class Flag:
    """asyncio.Event as uvicorn uses it (set, clear, wait) without a deque per connection."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        while not self._set:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter


class SignalingWebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Flag()  # type: ignore[assignment]
        self.writable.set()
        self.frame_handler: FrameHandler | None = None
        self.on_lost: Callable[[], None] | None = None  # set when the app has detached
        self.pending: list[bytes] = []
        self.pending_bytes = 0

    def data_received(self, data: bytes) -> None:
        global _batch
        if _batch is not None:  # not expected (no nesting), but then the outer one flushes
            return super().data_received(data)
        _batch = batch = []
        try:
            super().data_received(data)
        finally:
            _batch = None
            for protocol in batch:
                protocol.flush()

    def flush(self) -> None:
        frames, self.pending, self.pending_bytes = self.pending, [], 0
        # A close may have come in the meantime: RFC 6455 §5.5.1, no data after it.
        if frames and not self.close_sent and self.conn.state is State.OPEN:
            self.transport.write(b"".join(frames))

    async def send(self, message: Any) -> None:
        self.flush()  # whatever the app sends through ASGI (say, a close) goes after
        await super().send(message)
        if self.handshake_complete:
            # The handshake's request and response (a few KB of headers) are no longer needed;
            # the app keeps what it needs in its scope.
            self.request = self.response = None

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # None: the handshake was refused
            scope["extensions"][LANE] = Lane(self)
        conn = self.conn
        if not conn.reader.buffer:
            # websockets' server parser keeps the handshake request (its headers) alive in its
            # frame for the life of the connection; the frame parser it goes on to run is the
            # base class's, which can take over here: it has read nothing of a frame yet.
            conn.parser = Protocol.parse(conn)
            next(conn.parser)

    def send_receive_event_to_app(self) -> None:
        handler = self.frame_handler
        # Only when nothing is queued for the app: frames keep their order.
        if handler is None or self.close_sent or not self.queue.empty():
            return super().send_receive_event_to_app()
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.curr_msg_data_type != "text":
            return handler(None, data)
        try:
            text = data.decode()
        except UnicodeDecodeError:  # RFC 6455 §8.1: uvicorn fails the connection with 1007
            self.frames = [data]
            return super().send_receive_event_to_app()
        handler(text, None)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        on_lost, self.on_lost = self.on_lost, None
        self.frame_handler = None
        if on_lost is not None:
            on_lost()

    async def run_asgi(self) -> None:
        """uvicorn's, except that a detached connection stays open when the app returns."""
        try:
            result = await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BaseException:
            self.logger.exception("Exception in ASGI application\n")
            self.send_500_response()
        else:
            if not self.handshake_complete:
                self.logger.error("ASGI callable returned without completing handshake.")
                self.send_500_response()
            elif result is not None:
                self.logger.error("ASGI callable should return None, but returned %r.", result)
        if self.on_lost is None:
            if self.close_timer is None:
                self.transport.close()
        else:  # detached: the app keeps nothing of the handshake, nor need we
            self.scope = None  # type: ignore[assignment]

    def close_now(self, code: int, reason: str) -> None:
        self.flush()
        if self.close_sent or self.disconnected or self.conn.state is not State.OPEN:
            return
        self.conn.send_close(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if self.read_paused:  # read on: the client's close frame must get through
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)

    def send_now(self, text: str) -> bool:
        conn = self.conn
        if self.close_sent or self.disconnected or conn.state is not State.OPEN:
            return False
        payload = text.encode()
        if conn.extensions or conn.expect_continuation_frame:  # say, permessage-deflate
            self.flush()
            conn.send_text(payload)
            self.transport.write(b"".join(conn.data_to_send()))
            return True
        frame = text_frame_header(len(payload)) + payload  # RFC 6455 §5.2: unmasked, whole
        if _batch is None:
            self.transport.write(frame)
        else:
            if not self.pending:
                _batch.append(self)
            self.pending.append(frame)
            self.pending_bytes += len(frame)
        return True


def text_frame_header(length: int) -> bytes:
    """FIN + opcode 1 (text), no mask, and the payload length in 7, 7+16 or 7+64 bits."""
    if length < 126:
        return bytes((0x81, length))
    if length < 65536:
        return _HEADER_16.pack(0x81, 126, length)
    return _HEADER_64.pack(0x81, 127, length)


_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")
