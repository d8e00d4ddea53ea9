"""README: "make run, then open http://localhost:3000": that page works with every default.

The default ports (3000, 3478) may be taken on the test machine, and a direct WebRTC path would
use its real interfaces; so the server and Chromium run in a new network namespace with only
loopback (`unshare --net`, which needs root, as on CI). There the path is direct, not relayed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from netns import need_netns, run_in_netns

from .browserkit import need_browser

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent


def test_quick_start_page_works_with_defaults_on_localhost_3000() -> None:
    need_browser()
    need_netns()
    result = run_in_netns(HERE / "quickstart.py")
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output
    # Both people connected, peer to peer (no relay: loopback is all there is), and chatted.
    assert "alice: Guest 1: connected, direct" in result.stdout, output
    assert "bob: Guest 1: connected, direct" in result.stdout, output
    assert "bob got: hello from the quick start" in result.stdout, output
