"""Run by test_check_page.py inside a network namespace whose firewall drops UDP to port 3478.

Starts `p2pserver` on its default ports (free in a namespace of its own), opens its connection
check page in Chromium, waits for the verdict, and prints what the page shows: one line per
result row (`first|final id state: detail`), the errors, then `first|final verdict KIND: text`:
`first` as soon as there is a verdict, `final` once the browser has said why the rest failed.
Screenshots at 1280 and 360 px wide go to ARTIFACTS. Exits non-zero when a step fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import subprocess
import sys
import time
import urllib.request

from browserkit import ARTIFACTS, CHROMIUM_ARGS, need_browser
from playwright.sync_api import Page, expect, sync_playwright

URL = "http://127.0.0.1:3000"
TIMEOUT = 90_000  # the page's own bounds are 10 s and 45 s; this is for a slow, shared machine


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: no orphan if we are killed


def _wait_healthy(server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert server.poll() is None, f"p2pserver exited with {server.returncode}"
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{URL}/healthz", timeout=2) as response,
        ):
            if response.status == 200:
                return
        assert time.monotonic() < deadline, "p2pserver not healthy in 60 s"
        time.sleep(0.1)


def show(page: Page, when: str) -> None:
    """Print what the page shows now, each line starting with `when`."""
    for row in page.locator("#results li").all():
        state = row.get_attribute("data-state")
        detail = row.locator(".detail").inner_text()
        print(f"{when} {row.get_attribute('id')} {state}: {detail}")
    for line in page.locator("#errors li").all_inner_texts():
        print(f"{when} error {line}")
    verdict = page.locator("#verdict").inner_text()
    print(f"{when} verdict {page.locator('#verdict-box').get_attribute('data-verdict')}: {verdict}")


def main(workdir: str) -> int:
    server = subprocess.Popen(
        [sys.executable, "-m", "p2pserver", "--allow-peer", "127.0.0.0/8", "--no-self-test"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )
    try:
        _wait_healthy(server)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=need_browser(), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(TIMEOUT)
            try:
                ARTIFACTS.mkdir(exist_ok=True)
                page.goto(f"{URL}/check")
                box = page.locator("#verdict-box")
                expect(box).not_to_have_attribute("data-verdict", "checking", timeout=TIMEOUT)
                show(page, "first")
                # Chromium gives its reasons for a server that never answered about 40 s on.
                waiting = "waiting for the browser's reason"
                expect(page.locator("#results")).not_to_contain_text(waiting, timeout=TIMEOUT)
                show(page, "final")
                page.screenshot(path=ARTIFACTS / "check-page-udp-blocked-1280.png", full_page=True)
                page.set_viewport_size({"width": 360, "height": 800})
                widths = "[document.documentElement.scrollWidth, innerWidth]"
                print("width at 360: {} of {}".format(*page.evaluate(widths)))
                page.screenshot(path=ARTIFACTS / "check-page-udp-blocked-360.png", full_page=True)
            except Exception:
                with contextlib.suppress(Exception):
                    page.screenshot(path=ARTIFACTS / "check-page-udp-blocked-failed.png")
                raise
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
