"""uvicorn.Server as this app needs it: WebSockets get 1001, SIGTERM exits 0, no room ids logged."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import uvicorn

from p2pserver.config import Settings
from p2pserver.wsserver import SignalingWebSocketProtocol

log = logging.getLogger("p2pserver")

_ROOM_PATH = re.compile(r"^/(ws|check-chat)/[^/?]*")

# CPython collects its youngest generation every 700 net allocations and everything every 100
# of those. A signaling server keeps what each peer's connection allocates, so under a crowd of
# joins that ran 3 full collections of 27 ms each per 4,000 peers, a tenth of the server's time
# (bench/README.md, "The garbage collector"). Every 5,000 runs none in such a burst; full
# collections still come, a seventh as often.
GC_YOUNG_THRESHOLD = 5000


def tune_gc() -> None:
    """Collect the youngest generation every GC_YOUNG_THRESHOLD allocations, at the least."""
    young, middle, old = gc.get_threshold()
    if young:  # 0: collection is off, and stays so
        gc.set_threshold(max(young, GC_YOUNG_THRESHOLD), middle, old)


class RedactRoomIds(logging.Filter):
    """Room ids are capabilities: keep them out of uvicorn's per-connection log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _ROOM_PATH.sub(r"/\1/<room>", arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        return True


def redact_room_ids() -> None:
    for name in ("uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactRoomIds) for f in logger.filters):
            logger.addFilter(RedactRoomIds())


def uvicorn_config(app: object, settings: Settings, **overrides: object) -> uvicorn.Config:
    """uvicorn as this app needs it: the frame limit behind 1009, proxy headers, 5 s drain,
    the WebSocket protocol and its compression."""
    options: dict[str, object] = {
        "host": settings.http_host,
        "port": settings.http_port,
        "log_level": settings.log_level,
        "log_config": None,  # uvicorn's records go through our root handler (logs.py)
        "access_log": False,
        "proxy_headers": True,
        "ws_max_size": settings.ws_max_message + 1024,
        # Our protocol (uvicorn's sans-I/O one plus a lane for joined peers) and no
        # permessage-deflate unless asked: docs/api.md and bench/README.md say why.
        "ws": SignalingWebSocketProtocol,
        "ws_per_message_deflate": settings.ws_compression,
        "timeout_graceful_shutdown": 5,
        "lifespan": "on",
    }
    return uvicorn.Config(app, **{**options, **overrides})  # type: ignore[arg-type]


def health_url(sockname: tuple[Any, ...]) -> str:
    """The /healthz URL a check on this host uses for a socket bound to `sockname`."""
    host, port = sockname[0], sockname[1]
    # A wildcard bind answers on loopback; a specific address answers only there.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


def replace_file(path: str, text: str) -> None:
    """Write `path` whole: a reader (a health check, a test waiting for the ports) never sees
    a half-written file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(tmp, path)


def write_health_file(path: str, url: str) -> None:
    """Tell `python -m p2pserver.healthcheck` where to look (the port may be a flag)."""
    try:
        replace_file(path, url + "\n")
    except OSError as exc:
        log.warning("cannot write the health file %s: %s", path, exc)


class DrainingServer(uvicorn.Server):
    """Close the app's WebSockets with 1001 (going away) before uvicorn's own shutdown.

    uvicorn closes open WebSockets itself with 1012 (service restart) and only then runs the
    lifespan shutdown, so the app gets no say in the close code unless it goes first.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        drain: Callable[[], Awaitable[None]],
        health_file: str | None = None,
        on_listening: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(config)
        self._drain = drain
        self._health_file = health_file
        self._on_listening = on_listening  # told the HTTP port once it listens (--ready-file)
        redact_room_ids()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        listening = [s.getsockname() for server in self.servers for s in server.sockets]
        if not (self.started and listening):
            return
        if self._health_file:
            write_health_file(self._health_file, health_url(listening[0]))
        if self._on_listening is not None:
            self._on_listening(listening[0][1])

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._health_file:  # draining is not healthy: a check from now on fails fast
            with contextlib.suppress(OSError):
                os.unlink(self._health_file)
        for server in self.servers:  # stop accepting before saying goodbye
            server.close()
        await self._drain()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn re-raises a captured SIGTERM after its graceful shutdown, which ends the
        # process with status 143; a finished graceful shutdown should be a clean exit.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
