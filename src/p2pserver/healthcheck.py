"""`python -m p2pserver.healthcheck [FILE]`: the container image's HEALTHCHECK.

It asks the running server's `/healthz` at the URL the server wrote to its `--health-file` once it
was listening (FILE, else $P2P_HEALTH_FILE), so a port or address given as a flag, which this
separate process cannot see, is the one checked. Exit 0 when healthy, 1 otherwise, with one line
saying why (Docker and podman keep it in the container's health log). See docs/deploy.md.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

TIMEOUT = 4.0  # below the image's HEALTHCHECK --timeout


def check(health_file: str) -> tuple[bool, str]:
    try:
        with open(health_file) as file:
            url = file.read().strip()
    except FileNotFoundError:
        return False, f"not listening (yet): no {health_file}"
    except OSError as exc:
        return False, f"cannot read {health_file}: {exc}"
    # Never through a proxy from the environment: the server is on this host.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=TIMEOUT) as response:
            return True, f"{url} answered {response.status}"
    except urllib.error.HTTPError as exc:
        body = exc.read(200).decode(errors="replace").strip()
        return False, f"{url} answered {exc.code}: {body}"
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return False, f"{url}: {reason}"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    health_file = args[0] if args else os.environ.get("P2P_HEALTH_FILE")
    if not health_file:
        print("unhealthy: no health file (pass one, or set P2P_HEALTH_FILE)")
        return 1
    healthy, detail = check(health_file)
    print(("healthy: " if healthy else "unhealthy: ") + detail)
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
