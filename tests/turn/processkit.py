"""`p2pserver` run as a process for a test: the ports it bound (it binds port 0 and logs what it
got, so no port is picked by the test and lost to another), its log, and a clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from pathlib import Path

P2PSERVER = Path(sys.executable).with_name("p2pserver")
LISTENING = re.compile(rb"STUN/TURN listening on (udp|tcp|tls) (\S+):(\d+)")
TIMEOUT = 20.0


class ServerProcess:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.ports: dict[str, int] = {}
        self.log: list[bytes] = []
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, *args: str, transports: tuple[str, ...] = ("udp", "tcp")) -> ServerProcess:
        """Run `p2pserver *args` and wait until each of `transports` is listening."""
        process = await asyncio.create_subprocess_exec(
            str(P2PSERVER),
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        server = cls(process)
        try:
            await server.wait_listening(transports)
        except BaseException:
            await server.stop()
            raise
        return server

    @property
    def port(self) -> int:
        """The UDP and TCP port."""
        return self.ports["udp"]

    async def wait_listening(self, transports: tuple[str, ...]) -> None:
        """Read the log until every transport listens; the ports come from there (port 0)."""
        stream = self.process.stderr
        assert stream is not None
        try:
            async with asyncio.timeout(TIMEOUT):
                while not set(transports) <= self.ports.keys():
                    line = await stream.readline()
                    if not line:
                        raise AssertionError(f"p2pserver exited:\n{self.text()}")
                    self.log.append(line)
                    match = LISTENING.search(line)
                    if match:
                        self.ports[match[1].decode()] = int(match[3])
        except TimeoutError:
            raise AssertionError(f"p2pserver did not start listening:\n{self.text()}") from None
        self._reader = asyncio.create_task(self._drain(stream))

    def text(self) -> str:
        return b"".join(self.log).decode(errors="replace")

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():  # keep reading, or a full pipe blocks the server
            self.log.append(line)

    async def stop(self) -> int:
        """SIGTERM, wait, and read the log to its end; returns the exit status."""
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), TIMEOUT)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._reader, TIMEOUT)
        assert self.process.returncode is not None
        return self.process.returncode
