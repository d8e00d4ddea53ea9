"""Run by test_check.py inside a network namespace whose firewall drops UDP to port 3478.

Starts `p2pserver` on its default ports (free in a namespace of its own), waits until it is
healthy, runs `p2pserver check`, prints what it said and exits with its status.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request

URL = "http://127.0.0.1:3000"


def main(workdir: str) -> int:
    server = subprocess.Popen(
        [sys.executable, "-m", "p2pserver", "--allow-peer", "127.0.0.0/8", "--no-self-test"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                print(f"p2pserver exited with {server.returncode}")
                return 3
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{URL}/healthz", timeout=2):
                break
            if time.monotonic() > deadline:
                print("p2pserver not healthy in 60 s")
                return 3
            time.sleep(0.1)
        check = [sys.executable, "-m", "p2pserver", "check", URL, "--timeout", "2"]
        result = subprocess.run(check, capture_output=True, text=True, timeout=120)
        print(result.stdout + result.stderr, end="")
        return result.returncode
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
