"""The relay self-test the TURN server runs against itself once it listens.

Each listener (UDP, TCP, TLS) is tried over loopback, and again at the advertised address
(`--external-ip`, else `--public-host` when it is an IP), with two allocations relaying to each
other (turnprobe.py). Their datagrams are handed over inside the server (docs/turn.md, "Relay to
relay"), so whether the advertised address is right shows in reaching its listeners. The leg to
a plain peer is left to `p2pserver check` run from elsewhere: the server's own addresses are no
peer the policy lets a relay reach (docs/turn.md, peer policy).
The verdict is logged and reported by `/healthz` (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from typing import Any

from p2pserver import credentials
from p2pserver.config import Settings
from p2pserver.turnprobe import ProbeResult, probe

log = logging.getLogger(__name__)

TIMEOUT = 3.0


class SelfTest:
    def __init__(self, settings: Settings, secret: str | None) -> None:
        self.settings = settings
        self.secret = secret
        self.status = "off"  # off, running, ok, failed or skipped
        self.reason = ""
        self.results: list[tuple[str, ProbeResult]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self, listening: list[tuple[str, str, int]]) -> None:
        """Begin testing `(transport, host, port)` listeners in the background."""
        self.status = "running"
        self._task = asyncio.create_task(self._run(listening))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def report(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "checks": [{"via": via, **result.as_dict()} for via, result in self.results],
        }

    def _credentials(self) -> tuple[str, str] | None:
        if self.secret:  # a TURN REST API credential, as the signaling would hand out
            return credentials.issue(self.secret, "self-test", 300, time.time())
        users = self.settings.users
        return users[0] if users else None

    def _targets(self, listening: list[tuple[str, str, int]]) -> list[tuple[str, str, str, int]]:
        targets = []
        advertised = self.settings.external_ip or _ip_or_none(self.settings.public_host)
        for transport, host, port in listening:
            loopback = "::1" if ":" in host else "127.0.0.1"
            if host not in ("0.0.0.0", "::") and not ipaddress.ip_address(host).is_loopback:
                loopback = host  # bound to one address: loopback does not reach it
            via = "loopback" if ipaddress.ip_address(loopback).is_loopback else "listen"
            targets.append((via, transport, loopback, port))
            if advertised and advertised != loopback:
                targets.append(("advertised", transport, advertised, port))
        return targets

    async def _run(self, listening: list[tuple[str, str, int]]) -> None:
        login = self._credentials()
        if login is None:
            self.status, self.reason = "skipped", "no --secret and no --user to test with"
            log.warning("relay self-test skipped: %s", self.reason)
            return
        for via, transport, host, port in self._targets(listening):
            result = await probe(
                (host, port), transport, login[0], login[1], peer=False, timeout=TIMEOUT
            )
            self.results.append((via, result))
        failed = [f"{via} {r.line()}{self._hint(via)}" for via, r in self.results if not r.ok]
        if failed:
            self.status, self.reason = "failed", "; ".join(failed)
            log.warning("relay self-test FAILED: %s", self.reason)
        else:
            self.status = "ok"
            passed = ", ".join(f"{r.transport} via {via}" for via, r in self.results)
            log.info("relay self-test ok: %s relay to relay", passed)

    def _hint(self, via: str) -> str:
        # Relay to relay is handed over inside the server (docs/turn.md, "Relay to relay"), so
        # a wrong --external-ip shows only here, where the address itself is tried.
        external = self.settings.external_ip
        if via == "advertised" and external:
            return f" (is --external-ip {external} this host's public address?)"
        return ""


def _ip_or_none(host: str | None) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]"))) if host else None
    except ValueError:
        return None
