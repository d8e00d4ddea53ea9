"""Run by test_check.py inside a network namespace whose firewall drops UDP to port 3478.

Starts `p2pserver` on its default ports (free in a namespace of its own), waits until it is
healthy, runs `p2pserver check`, prints what it said and exits with its status.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from netns import URL, start_server


def main(workdir: str) -> int:
    server = start_server(Path(workdir), "--allow-peer", "127.0.0.0/8", "--no-self-test")
    try:
        check = [sys.executable, "-m", "p2pserver", "check", URL, "--timeout", "2"]
        result = subprocess.run(check, capture_output=True, text=True, timeout=120)
        print(result.stdout + result.stderr, end="")
        return result.returncode
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
