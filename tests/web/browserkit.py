"""Helpers for the browser tests: the real `p2pserver` process and Debian's Chromium.

Chromium comes from Debian (`apt-get install chromium`, as .ci/run does); Playwright drives it
through `executable_path`, so `playwright install` (a download) is never needed. Without either,
these tests skip and say why, or with CI set fail (tests/realtools.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from realtools import need_module, need_program

if TYPE_CHECKING:
    from playwright.sync_api import Page

ARTIFACTS = Path(__file__).parents[2] / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # WebRTC ignores loopback addresses (here: the TURN server's relays) without this.
    "--allow-loopback-in-peer-connection",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
]


def need_browser() -> str:
    """Playwright and Chromium, or skip (fail with CI set); returns Chromium's path."""
    need_module("playwright", "pip install -e '.[test]'")
    return need_program("chromium", "apt-get install chromium; .ci/run does")


# -- the server -------------------------------------------------------------------------------


def _get(url: str, timeout: float = 2.0) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@dataclass
class ServerProcess:
    """`python -m p2pserver` on 127.0.0.1 with its own ports and database."""

    workdir: Path
    http_port: int = 0  # 0 until started: the server binds free ports itself (--ready-file)
    turn_port: int = 0
    relay_to_loopback: bool = True  # False: the production peer policy, loopback refused
    turn_workers: int = 2  # TURN in two worker processes, as on a 2-core host by default
    extra: tuple[str, ...] = ()  # more flags (e.g. --redis URL)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    @property
    def ready_path(self) -> Path:
        return self.workdir / "ready.json"

    def start(self) -> None:
        args = [
            *("--http-host", "127.0.0.1", "--http-port", str(self.http_port)),
            *("--db", str(self.workdir / "rooms.db"), "--log-level", "info"),
            *("--turn-host", "127.0.0.1", "--turn-port", str(self.turn_port)),
            *("--turn-workers", str(self.turn_workers)),
            *("--ready-file", str(self.ready_path)),
            "--public-host",
            "127.0.0.1",
        ]
        if self.relay_to_loopback:
            # The browsers' relay candidates are on 127.0.0.1, which TURN refuses by default.
            args += ["--allow-peer", "127.0.0.0/8"]
        args += self.extra
        env = {k: v for k, v in os.environ.items() if not k.startswith("P2P_")}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "p2pserver", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**env, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"p2pserver exited {self.proc.returncode}:\n{self.log()}")
            if self.ready_path.exists() and not self.http_port:
                ports = json.loads(self.ready_path.read_text())
                self.http_port, self.turn_port = ports["http"], ports["udp"]
            with contextlib.suppress(OSError):
                if self.http_port and _get(f"{self.url}/healthz") == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"p2pserver not healthy within 60 s:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self) -> int:
        """SIGTERM, as an operator stopping the service would; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


class ServerFactory:
    """Starts servers in subdirectories of `root`; kill_all() at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[ServerProcess] = []

    def __call__(
        self, *, relay_to_loopback: bool = True, extra: tuple[str, ...] = ()
    ) -> ServerProcess:
        workdir = self.root / f"server{len(self.started)}"
        workdir.mkdir()
        process = ServerProcess(workdir, relay_to_loopback=relay_to_loopback, extra=extra)
        self.started.append(process)
        process.start()
        return process

    def kill_all(self) -> None:
        for process in self.started:
            process.kill()


@dataclass
class Person:
    """One person: a fresh browser profile (context) with one page, and its console output."""

    name: str
    page: Page
    console: list[str]


OpenPerson = Callable[[str], Person]
