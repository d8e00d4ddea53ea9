"""README: "make run, then open http://localhost:3000": that page works with every default.

The default ports (3000, 3478) may be taken on the test machine, and a direct WebRTC path would
use its real interfaces; so the server and Chromium run in a new network namespace with only
loopback (`unshare --net`, which needs root, as on CI). There the path is direct, not relayed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from realtools import need, need_program

from .browserkit import need_browser

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent


def _need_netns() -> None:
    """Chromium, and a loopback-only network namespace: unshare and ip, as root."""
    need_browser()
    need_program("unshare", "apt-get install util-linux")
    need_program("ip", "apt-get install iproute2")
    need("unshare --net", None if os.geteuid() == 0 else "a network namespace needs root")
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=30)
    problem = probe.stderr.decode(errors="replace") if probe.returncode else None
    need("unshare --net", problem)


def test_quick_start_page_works_with_defaults_on_localhost_3000() -> None:
    _need_netns()
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2P_")}
    env["PYTHONPATH"] = str(HERE.parent)  # for realtools, as pytest's pythonpath gives the tests
    # --fork --kill-child: if this test times out, nothing is left running in the namespace.
    command = ["unshare", "--net", "--fork", "--kill-child", "--"]
    command += [sys.executable, str(HERE / "quickstart.py")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output
    # Both people connected, peer to peer (no relay: loopback is all there is), and chatted.
    assert "alice: Guest 1: connected, direct" in result.stdout, output
    assert "bob: Guest 1: connected, direct" in result.stdout, output
    assert "bob got: hello from the quick start" in result.stdout, output
