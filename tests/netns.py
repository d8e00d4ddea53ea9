"""Network namespaces of a test's own (`unshare --net`, as root): only loopback, default ports
free, and optionally a firewall that drops UDP to one port. Both sides of it live here: the test
that starts a script inside one, and what the script does there (start p2pserver, wait)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from realtools import need, need_program

TESTS = Path(__file__).parent
URL = "http://127.0.0.1:3000"  # p2pserver's defaults, free in a namespace of its own


def need_netns(firewall: bool = False) -> None:
    """Root, unshare and ip (and iptables for a firewall); see realtools.need()."""
    need_program("unshare", "apt-get install util-linux")
    need_program("ip", "apt-get install iproute2")
    if firewall:
        need_program("iptables", "apt-get install iptables")
    need("unshare --net", None if os.geteuid() == 0 else "a network namespace needs root")
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=30)
    need("unshare --net", probe.stderr.decode(errors="replace") if probe.returncode else None)


def run_in_netns(
    script: Path, *args: str, drop_udp_to: int | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """Run `python script args` in a new namespace with loopback up (and UDP to one port
    dropped); --kill-child: if the test times out, nothing is left running in there."""
    setup = "ip link set lo up"
    if drop_udp_to is not None:
        setup += f" && iptables -A INPUT -p udp --dport {drop_udp_to} -j DROP"
    command = " ".join(f'"{part}"' for part in (sys.executable, script, *args))
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2P_")}
    env["PYTHONPATH"] = str(TESTS)  # as pytest's pythonpath gives the tests
    return subprocess.run(
        ["unshare", "--net", "--fork", "--kill-child", "--", "sh", "-c", f"{setup} && {command}"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: no orphan if we are killed


def start_server(workdir: Path, *args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
    """`python -m p2pserver args` in `workdir`, healthy on URL when this returns."""
    with open(log or os.devnull, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "p2pserver", *args],
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
    deadline = time.monotonic() + 60
    while True:
        if server.poll() is not None:
            raise AssertionError(f"p2pserver exited with {server.returncode}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{URL}/healthz", timeout=2) as response,
        ):
            if response.status == 200:
                return server
        if time.monotonic() > deadline:
            server.terminate()
            raise AssertionError("p2pserver not healthy in 60 s")
        time.sleep(0.1)
