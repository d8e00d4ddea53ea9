"""`python -m p2pserver` as a child process whose log is read as it grows (tests/ is on pytest's
pythonpath). For servers that must run on fixed ports or with HTTP; TURN-only servers on port 0
have tests/turn/processkit.py."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

TIMEOUT = 30.0


class Server:
    """`python -m p2pserver` with its log in a file, read as it grows."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("P2P_")}
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "p2pserver", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**env, "PYTHONUNBUFFERED": "1"},
            )

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_for(self, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + TIMEOUT
        while not (match := re.search(pattern, self.text())):
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode}:\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"never logged {pattern!r}:\n{self.text()}")
            await asyncio.sleep(0.05)
        return match

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
