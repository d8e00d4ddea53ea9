"""One TURN worker process: `python -m p2pserver.turn.worker PARENT_PID CONTROL_FD`.

Started by the supervisor (workers.py), which holds the listening sockets and passes this worker
its own (the fds named in its configuration). The configuration comes as the first message on
the control socket; then the worker serves, answers "stats" requests on that socket, and ends
when the supervisor says "stop", when the control socket closes, or when the parent dies
(SIGINT and SIGTERM it ignores: they are the supervisor's to act on) (docs/turn.md, "Workers").
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pickle
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from p2pserver.config import Settings, StartupError
from p2pserver.logs import configure_logging

if TYPE_CHECKING:
    from p2pserver.turn.server import TurnServer

log = logging.getLogger("p2pserver.turn.worker")

_PR_SET_PDEATHSIG = 1  # prctl(2)
MESSAGE_MAX = 1 << 16


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker needs, sent by the supervisor as the first control message (pickled: the
    socket pair is private to the two processes)."""

    index: int
    workers: int
    settings: Settings  # whole relay range (the peer policy), this worker's share of quotas
    secret: str | None
    relay_ports: tuple[int, int]  # this worker's slice of the range
    udp_fd: int
    tcp_fd: int
    tls_fd: int | None
    quota_fd: int
    quota_key: bytes
    nonce_key: bytes  # the same for every worker and restart: a nonce stays good
    reservation_key: bytes  # the same for every worker: any of them takes a RESERVATION-TOKEN


def die_with_parent(parent: int) -> None:
    """Linux sends us SIGKILL when the process that started us ends, even by SIGKILL; and if
    it ended before this call, we go now."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


async def serve(config: WorkerConfig, control: socket.socket) -> int:
    from p2pserver.turn.quota import SharedUserCounts
    from p2pserver.turn.server import Listeners, TurnServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    listeners = Listeners(
        udp=socket.socket(fileno=config.udp_fd),
        tcp=socket.socket(fileno=config.tcp_fd),
        tls=socket.socket(fileno=config.tls_fd) if config.tls_fd is not None else None,
    )
    counts = SharedUserCounts(config.quota_fd, config.workers, config.index, config.quota_key)
    server = TurnServer(
        config.settings,
        config.secret,
        listeners=listeners,
        relay_ports=config.relay_ports,
        user_counts=counts,
        nonce_key=config.nonce_key,
        reservation_key=config.reservation_key,
    )
    loop.add_signal_handler(signal.SIGHUP, server.reload_tls)
    try:
        await server.start()
    except StartupError as exc:
        log.error("TURN worker %d: %s", config.index, exc)
        return 1
    low, high = config.relay_ports
    log.info(
        "TURN worker %d (pid %d) serving, relay ports %d-%d", config.index, os.getpid(), low, high
    )
    control.setblocking(False)
    await loop.sock_sendall(control, pickle.dumps(("ready", server.addresses)))
    answering = asyncio.create_task(_answer(control, server, stop))
    try:
        await stop.wait()
    finally:
        answering.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await answering
        await server.stop()
    return 0


async def _answer(control: socket.socket, server: TurnServer, stop: asyncio.Event) -> None:
    """Answer the supervisor; "stop", or its end closing (it is gone), stops this worker."""
    loop = asyncio.get_running_loop()
    try:
        while data := await loop.sock_recv(control, MESSAGE_MAX):
            request = pickle.loads(data)
            if request == "stats":
                await loop.sock_sendall(control, pickle.dumps(("stats", server.stats())))
            elif request == "stop":
                break
    except OSError:
        pass  # the supervisor is gone
    except Exception:
        # A bug on the control path: without it the supervisor can neither ask nor stop this
        # worker, so end it (logged with its traceback); the supervisor restarts it.
        log.exception("TURN worker: the control socket failed")
    finally:
        stop.set()


def _name_worker(index: int, fmt: str) -> None:
    """Every line this worker logs says which worker: a `worker` field in JSON, and in text
    after the logger's name (`p2pserver.turn.handlers[w1]`)."""

    def mark(record: logging.LogRecord) -> bool:
        if fmt == "json":
            record.worker = index
        elif not record.name.endswith("]"):
            record.name = f"{record.name}[w{index}]"
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(mark)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parent, control_fd = int(args[0]), int(args[1])
    die_with_parent(parent)
    # Ctrl-C, `timeout` and systemd signal the whole process group (or cgroup): the supervisor
    # stops its workers itself, in order, and a worker that stopped on its own would look to
    # it like one that died. A worker stops on "stop", or when its control socket closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    control = socket.socket(fileno=control_fd)
    # Unpickled as p2pserver.turn.worker.WorkerConfig (this file runs as __main__).
    config = pickle.loads(control.recv(MESSAGE_MAX))
    configure_logging(config.settings.log_level, config.settings.log_format)
    _name_worker(config.index, config.settings.log_format)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(config, control))
    return uvloop.run(serve(config, control))


if __name__ == "__main__":
    raise SystemExit(main())
