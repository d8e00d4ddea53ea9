"""The TURN supervisor: N worker processes (worker.py) on shared ports, restarted when they die.

Steering (docs/turn.md, "Workers"): the supervisor binds every worker's listening sockets itself,
N UDP, N TCP (and N TLS) sockets with SO_REUSEPORT on the same port, once, and holds them for
its whole life; each worker gets its own by fd inheritance. The kernel picks the socket of a
reuseport group by a hash of the 4-tuple over the group's members, so as long as the group does
not change, a client's flow always reaches the same worker. A worker that dies leaves its
sockets open here: the group stays as it was, other workers' flows stay put, and the restarted
worker takes over the same sockets (and whatever queued in them meanwhile).

Each worker owns a contiguous slice of the relay port range, so a peer's datagram to a relayed
address lands on the worker that holds that allocation. --max-allocations is split between the
workers; --user-quota is kept in a shared table (quota.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import pickle
import signal
import socket
import sys
import time
from dataclasses import replace
from typing import Any

from p2pserver.config import Settings, StartupError
from p2pserver.selftest import SelfTest
from p2pserver.turn import quota
from p2pserver.turn.server import Listeners, TurnServer, _os_reason
from p2pserver.turn.stats import COUNTERS, GAUGES
from p2pserver.turn.worker import MESSAGE_MAX, WorkerConfig

log = logging.getLogger("p2pserver.turn.workers")

START_TIMEOUT = 30.0  # a worker that is not serving by then fails the start
STOP_TIMEOUT = 3.0  # "stop", then SIGKILL after this
STATS_TIMEOUT = 1.0  # a worker that does not answer by then is reported not alive
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 10.0  # restart delay, doubled for each quick death
STABLE_AFTER = 30.0  # a worker that ran this long before dying is restarted at once again
_BACKLOG = 128


def turn_server(settings: Settings, secret: str | None = None) -> TurnServer | TurnWorkers:
    """The TURN server the settings ask for: in this process, or in --turn-workers processes."""
    if settings.turn_workers > 1:
        return TurnWorkers(settings, secret)
    return TurnServer(settings, secret)


def slices(ports: tuple[int, int], count: int) -> list[tuple[int, int]]:
    """The relay range cut into `count` contiguous slices, the first ones one port larger."""
    low, high = ports
    size, extra = divmod(high - low + 1, count)
    result = []
    for index in range(count):
        end = low + size + (1 if index < extra else 0) - 1
        result.append((low, end))
        low = end + 1
    return result


def shares(total: int, count: int) -> list[int]:
    """--max-allocations split so that the shares add up to it."""
    size, extra = divmod(total, count)
    return [size + (1 if index < extra else 0) for index in range(count)]


class Worker:
    """The supervisor's side of one worker: its process, control socket and last report."""

    def __init__(self, index: int, relay_ports: tuple[int, int], listeners: Listeners) -> None:
        self.index = index
        self.relay_ports = relay_ports
        self.listeners = listeners
        self.process: asyncio.subprocess.Process | None = None
        self.control: socket.socket | None = None
        self.ready: asyncio.Future[Any] | None = None
        self.replies: collections.deque[asyncio.Future[dict[str, int]]] = collections.deque()
        self.report: dict[str, int] = {}
        self.answered = False  # answered the last stats request
        self.restarts = 0
        self.started = 0.0
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def launch(self, config: WorkerConfig, fds: tuple[int, ...]) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "p2pserver.turn.worker",
                str(os.getpid()),
                str(theirs.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(), *fds),
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        self.control = ours
        self.started = time.monotonic()
        self.ready = loop.create_future()
        self.answered = True
        await loop.sock_sendall(ours, pickle.dumps(config))
        self._reader = asyncio.create_task(self._read(ours, self.ready))

    async def _read(self, control: socket.socket, ready: asyncio.Future[Any]) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while data := await loop.sock_recv(control, MESSAGE_MAX):
                kind, value = pickle.loads(data)
                if kind == "ready" and not ready.done():
                    ready.set_result(value)
                elif kind == "stats" and self.replies:  # answers come in the order asked
                    reply = self.replies.popleft()
                    if not reply.done():
                        reply.set_result(value)
        if not ready.done():
            ready.set_result(None)  # it ended before it was serving

    async def tell(self, request: str) -> None:
        if self.control is not None and self.running:
            with contextlib.suppress(OSError):
                await asyncio.get_running_loop().sock_sendall(self.control, pickle.dumps(request))

    async def ask_stats(self) -> None:
        """Ask for a stats snapshot; `answered` says whether it came in time."""
        control = self.control
        if control is None or not self.running:
            self.answered = False
            return
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[dict[str, int]] = loop.create_future()
        self.replies.append(reply)
        try:
            await loop.sock_sendall(control, pickle.dumps("stats"))
            self.report = await asyncio.wait_for(asyncio.shield(reply), STATS_TIMEOUT)
            self.answered = True
        except (OSError, TimeoutError):
            self.answered = False

    async def ended(self) -> None:
        """The process is gone: close our end of its control socket."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self.control is not None:
            self.control.close()
            self.control = None
        self.replies.clear()


class TurnWorkers:
    """STUN/TURN served by `settings.turn_workers` processes; the same face as TurnServer
    (start, stop, addresses, stats, reload_tls, self_test) plus each worker's liveness."""

    def __init__(self, settings: Settings, secret: str | None = None) -> None:
        self.settings = settings
        self.secret = secret if secret is not None else settings.secret
        self.count = settings.turn_workers
        self.addresses: list[tuple[str, str, int]] = []
        self.self_test = SelfTest(settings, self.secret)
        self.workers: list[Worker] = []
        self.retired: dict[str, int] = dict.fromkeys(COUNTERS, 0)  # counts of workers gone
        self._sockets: list[socket.socket] = []
        self._quota_fd: int | None = None
        self._quota: quota.SharedUserCounts | None = None
        self._quota_key = os.urandom(16)
        self._nonce_key = os.urandom(32)
        self._reservation_key = os.urandom(32)
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False

    # --- start --------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        if not (s.users or self.secret):
            log.warning("no --user and no --secret: every TURN request will be refused")
        # The same checks a worker makes, here, so that a bad certificate is one line.
        TurnServer(s, self.secret)._tls_context()
        listeners = self._bind_all()
        self._quota_fd = quota.create(self.count)
        self._quota = quota.SharedUserCounts(self._quota_fd, self.count, -1, self._quota_key)
        for index, ports in enumerate(slices(s.relay_ports, self.count)):
            self.workers.append(Worker(index, ports, listeners[index]))
        try:
            for worker in self.workers:
                await self._launch(worker)
            for worker in self.workers:
                assert worker.ready is not None
                await self._wait_ready(worker)
        except BaseException:
            await self.stop()
            raise
        self._watchers = [asyncio.create_task(self._watch(w)) for w in self.workers]
        for transport_name, host, port in self.addresses:
            log.info("STUN/TURN listening on %s %s:%d", transport_name, host, port)
        low, high = s.relay_ports
        shown = " and ".join(s.relay_bind_ips.values())
        log.info(
            "relays on %s ports %d-%d, realm %r, %d TURN workers",
            shown,
            low,
            high,
            s.realm,
            self.count,
        )
        if s.self_test:  # once, from here, against the shared ports (selftest.py)
            self.self_test.start(self.addresses)

    async def _wait_ready(self, worker: Worker) -> None:
        assert worker.ready is not None and worker.process is not None
        try:
            addresses = await asyncio.wait_for(asyncio.shield(worker.ready), START_TIMEOUT)
        except TimeoutError:
            raise StartupError(f"TURN worker {worker.index} did not start in time") from None
        if addresses is None:
            status = await worker.process.wait()
            raise StartupError(f"TURN worker {worker.index} {_ending(status)} (its log says why)")

    def _config(self, worker: Worker) -> tuple[WorkerConfig, tuple[int, ...]]:
        s = self.settings
        bound = {name: port for name, _, port in self.addresses}
        settings = replace(
            s,
            turn_port=bound["udp"],
            tls_port=bound.get("tls", s.tls_port),
            max_allocations=shares(s.max_allocations, self.count)[worker.index],
            self_test=False,
            turn_workers=1,
        )
        given = worker.listeners
        assert self._quota_fd is not None
        config = WorkerConfig(
            index=worker.index,
            workers=self.count,
            settings=settings,
            secret=self.secret,
            relay_ports=worker.relay_ports,
            udp_fd=given.udp.fileno(),
            tcp_fd=given.tcp.fileno(),
            tls_fd=given.tls.fileno() if given.tls is not None else None,
            quota_fd=self._quota_fd,
            quota_key=self._quota_key,
            nonce_key=self._nonce_key,
            reservation_key=self._reservation_key,
        )
        fds = (config.udp_fd, config.tcp_fd, self._quota_fd)
        if config.tls_fd is not None:
            fds += (config.tls_fd,)
        return config, fds

    async def _launch(self, worker: Worker) -> None:
        await worker.launch(*self._config(worker))

    # --- the sockets ----------------------------------------------------------------------------

    def _bind_all(self) -> list[Listeners]:
        """Every worker's listening sockets; with port 0, on ports the OS says are free."""
        s = self.settings
        for attempt in range(1 if s.turn_port else 20):
            try:
                return self._bind(s.turn_port)
            except OSError as exc:
                for sock in self._sockets:
                    sock.close()
                self._sockets.clear()
                self.addresses.clear()
                if s.turn_port or exc.errno != errno.EADDRINUSE or attempt == 19:
                    transport, port = getattr(exc, "binding", ("udp", s.turn_port))
                    raise StartupError(
                        f"STUN/TURN cannot listen on {transport} {s.turn_host}:{port}: "
                        f"{_os_reason(exc)}"
                    ) from exc
        raise AssertionError("unreachable")

    def _bind(self, port: int) -> list[Listeners]:
        s = self.settings
        tls = bool(s.tls_cert and s.tls_key)
        if not port:
            port = _free_port(s.turn_host)
        udp = [self._socket(socket.SOCK_DGRAM, "udp", port) for _ in range(self.count)]
        tcp = [self._socket(socket.SOCK_STREAM, "tcp", port) for _ in range(self.count)]
        self.addresses += [("udp", s.turn_host, port), ("tcp", s.turn_host, port)]
        secure: list[socket.socket | None] = [None] * self.count
        if tls:
            tls_port = s.tls_port or _free_port(s.turn_host, udp=False)
            secure = [self._socket(socket.SOCK_STREAM, "tls", tls_port) for _ in range(self.count)]
            self.addresses.append(("tls", s.turn_host, tls_port))
        return [Listeners(u, t, x) for u, t, x in zip(udp, tcp, secure, strict=True)]

    def _socket(self, kind: socket.SocketKind, name: str, port: int) -> socket.socket:
        host = self.settings.turn_host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, kind)
        self._sockets.append(sock)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:  # as asyncio's create_server does
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            else:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
            sock.bind((host, port))
            if kind == socket.SOCK_STREAM:
                sock.listen(_BACKLOG)
        except OSError as exc:
            exc.binding = (name, port)  # type: ignore[attr-defined]
            raise
        return sock

    # --- supervision --------------------------------------------------------------------------

    async def _watch(self, worker: Worker) -> None:
        """Restart the worker whenever it dies, until stop()."""
        failures = 0
        while True:
            assert worker.process is not None
            status = await worker.process.wait()
            await worker.ended()
            if self._stopping:
                return
            lost = worker.report.get("allocations", 0)
            for name, count in worker.report.items():  # what it counted stays in the totals
                if name not in GAUGES:
                    self.retired[name] = self.retired.get(name, 0) + count
            worker.report = {}
            if self._quota is not None:
                # Its allocations are gone. The one place a worker's row is cleared: a worker
                # killed could not, and its successor starts from this row.
                self._quota.clear(worker.index)
            failures = 0 if time.monotonic() - worker.started > STABLE_AFTER else failures + 1
            delay = 0.0 if failures == 0 else min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 1))
            log.error(
                "TURN worker %d (pid %s) %s; its allocations (%d at the last count) are lost, "
                "its clients must allocate again; restarting it in %.1f s",
                worker.index,
                worker.pid,
                _ending(status),
                lost,
                delay,
            )
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                await self._launch(worker)
                await self._wait_ready(worker)
            except (StartupError, OSError) as exc:
                log.error("TURN worker %d did not restart: %s", worker.index, exc)
                if worker.running and worker.process is not None:
                    worker.process.kill()
                continue
            worker.restarts += 1
            log.info("TURN worker %d restarted (pid %s)", worker.index, worker.pid)

    # --- the face of a TurnServer ---------------------------------------------------------------

    async def refresh(self) -> None:
        """Ask every worker for its numbers (what stats() and workers_report() then say)."""
        await asyncio.gather(*(worker.ask_stats() for worker in self.workers))

    def stats(self) -> dict[str, int]:
        """The sum over the workers' last reports; counters of workers that died stay in."""
        total = {"allocations": 0, "tcp_connections": 0, **self.retired}
        for worker in self.workers:
            for name, value in worker.report.items():
                total[name] = total.get(name, 0) + value
        return total

    def workers_report(self) -> list[dict[str, Any]]:
        return [
            {
                "worker": worker.index,
                "pid": worker.pid,
                "alive": worker.running and worker.answered,
                "restarts": worker.restarts,
                "relayPorts": f"{worker.relay_ports[0]}-{worker.relay_ports[1]}",
                "allocations": worker.report.get("allocations", 0),
            }
            for worker in self.workers
        ]

    @property
    def running(self) -> bool:
        return any(w.running and w.answered for w in self.workers)

    @property
    def port(self) -> int:
        return self.addresses[0][2]

    def reload_tls(self) -> bool:
        """SIGHUP: check the new certificate here, then have every worker load it."""
        s = self.settings
        if not (s.tls_cert and s.tls_key):
            return False
        try:
            TurnServer(s, self.secret)._tls_context()
        except StartupError as exc:
            log.error("TLS certificate not reloaded, keeping the old one: %s", exc)
            return False
        for worker in self.workers:
            if worker.running and worker.pid is not None:
                os.kill(worker.pid, signal.SIGHUP)
        log.info("TLS certificate reloaded from %s by every TURN worker", s.tls_cert)
        return True

    async def stop(self) -> None:
        self._stopping = True
        await self.self_test.stop()
        for worker in self.workers:  # workers ignore SIGTERM: see worker.py
            await worker.tell("stop")
        for worker in self.workers:
            process = worker.process
            if process is None:
                continue
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                log.warning("TURN worker %d did not stop in time: killed", worker.index)
                process.kill()
                await process.wait()
            await worker.ended()
        for watcher in self._watchers:
            watcher.cancel()
        for watcher in self._watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        self._watchers.clear()
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        if self._quota is not None:
            self._quota.close()
            self._quota = None
        if self._quota_fd is not None:
            os.close(self._quota_fd)
            self._quota_fd = None
        if self.workers:
            log.info("STUN/TURN stopped; %d TURN workers", len(self.workers))


def _free_port(host: str, udp: bool = True) -> int:
    """A port free for UDP and TCP (or TCP only). Asked with plain sockets: an SO_REUSEPORT
    socket bound to port 0 may be given a port that another group of this user holds."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM) as first:
            first.bind((host, 0))
            port = int(first.getsockname()[1])
            if not udp:
                return port
            with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_STREAM) as tcp:
                tcp.bind((host, port))
                return port
    raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")


def _ending(status: int) -> str:
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"
