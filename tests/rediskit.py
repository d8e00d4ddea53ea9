"""A real redis-server (Debian's) for the tests: on a free port of 127.0.0.1, in a temporary
directory, nothing written to disk, killed by PID at the end. redis-server has no `--port 0`,
so a port is picked and, should another process take it first, another one is tried."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netkit import free_port
from realtools import need_program

START_TIMEOUT = 10.0
ATTEMPTS = 5


def _answers(port: int) -> bool:
    """A PING on a plain socket gets +PONG (the server is up and loaded)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, program: str, directory: Path, persist: bool = False) -> None:
        self.program = program
        self.persist = persist  # an append-only file synced on every write: kill -9 loses nothing
        self.directory = directory
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "redis.log"
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start on a fresh port, or on the same one again after stop() (a restart)."""
        for _ in range(ATTEMPTS):
            port = self.port or free_port()
            if self._launch(port):
                self.port = port
                return
        said = self.log.read_text(errors="replace") if self.log.exists() else "(no log)"
        raise RuntimeError(f"redis-server did not start: {said}")

    def _launch(self, port: int) -> bool:
        command = [self.program, "--bind", "127.0.0.1", "--port", str(port)]
        command += ["--save", "", "--dir", str(self.directory)]
        command += ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else []
        command += [] if self.persist else ["--appendonly", "no"]
        command += ["--logfile", str(self.log), "--daemonize", "no"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:  # exited: the port was taken, most likely
                self.process = None
                return False
            if _answers(port):
                return True
            time.sleep(0.02)
        self.stop()
        return False

    def stop(self) -> None:
        """Kill it (by its PID) and wait until it is gone."""
        if self.process is not None:
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
            self.process = None


@contextlib.contextmanager
def running_redis(directory: Path, persist: bool = False) -> Iterator[RedisServer]:
    program = need_program("redis-server", "apt-get install redis-server")
    server = RedisServer(program, directory, persist)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of this test's own."""
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server
