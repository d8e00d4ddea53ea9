"""`python -m p2pserver` as a child process for a test, with its log in a file (tests/ is on
pytest's pythonpath): start it, wait for a log line or the ports it bound (--ready-file), stop
it. TURN-only servers read from a pipe have tests/turn/processkit.py."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

TIMEOUT = 20.0  # generous: the CI machine is small and noisy


async def wait_until(
    predicate: Callable[[], Any], timeout: float = TIMEOUT, what: str = "the condition"
) -> None:
    """Poll `predicate` (a function or a coroutine function) until it is true."""
    deadline = time.monotonic() + timeout
    while not await _call(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def _call(predicate: Callable[[], Any]) -> Any:
    result = predicate()
    return await result if isinstance(result, Awaitable) else result


class Process:
    """`python -m p2pserver` as a child process, with its output kept in a file."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}  # what it bound, by "http", "udp", "tcp", "tls"

    def start(self) -> None:
        log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env = {k: v for k, v in env.items() if not k.startswith("P2P_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "p2pserver", *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_ports(self, ready_file: Path) -> dict[str, int]:
        """The ports the server got: it binds port 0 itself and writes them to --ready-file."""

        def written() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
            return ready_file.exists()

        await wait_until(written, 60)
        ports: dict[str, int] = json.loads(ready_file.read_text())
        return ports

    async def wait_ready(self, http_url: str) -> None:
        async def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
            try:
                async with httpx.AsyncClient(timeout=2) as http:
                    return (await http.get(f"{http_url}/healthz")).status_code == 200
            except httpx.HTTPError:
                return False

        await wait_until(ready, 60)

    async def wait_for(self, pattern: str) -> re.Match[str]:
        """The first match of `pattern` in the log, once it is there."""

        def logged() -> re.Match[str] | None:
            assert self.proc is not None
            if (match := re.search(pattern, self.log())) is None and self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
            return match

        await wait_until(logged, 60)
        match = logged()
        assert match is not None
        return match

    def stop(self) -> int:
        """SIGTERM, as an operator stopping the service would; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(TIMEOUT)
        finally:
            self.kill()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not exit:\n{self.log()}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)


def run_server(args: list[str], log_path: Path) -> Process:
    """A Process already started."""
    process = Process(args, log_path)
    process.start()
    return process
