"""The README's quick start, literally: `p2pserver` with no flags, then http://localhost:3000.

Run by test_quick_start.py inside a new network namespace (`unshare --net`) that has only
loopback: the default ports are free there, and the browsers' direct path can only be loopback.
Prints what each page shows; exits non-zero (with screenshots in ARTIFACTS) when a step fails.
"""

from __future__ import annotations

import contextlib
import re
import sys
import tempfile
from pathlib import Path

from browserkit import ARTIFACTS, CHROMIUM_ARGS, need_browser
from playwright.sync_api import Page, expect, sync_playwright

from netns import start_server

URL = "http://localhost:3000"
TIMEOUT = 30_000


def run(pages: dict[str, Page]) -> None:
    alice, bob = pages["alice"], pages["bob"]
    alice.goto(URL)
    alice.get_by_role("button", name="Create a chat").click()  # with a PIN: the default
    link = alice.get_by_label("Send this link to the other person")
    expect(link).to_have_value(re.compile(r"^http://localhost:3000/#room=[\w-]{22}$"))
    pin = alice.locator("#pin-value").inner_text()
    bob.goto(link.input_value())
    bob.get_by_label("PIN", exact=True).fill(pin)
    bob.get_by_role("button", name="Join").click()
    for name, page in pages.items():
        expect(page.locator("#status")).to_have_text("Connected to 1 person.", timeout=TIMEOUT)
        peer = page.locator("#peers li")
        expect(peer).to_have_attribute("data-path", re.compile(r"\w"), timeout=TIMEOUT)
        print(f"{name}: {peer.inner_text()}")
    alice.get_by_role("textbox", name="Message").fill("hello from the quick start")
    alice.get_by_role("button", name="Send", exact=True).click()
    expect(bob.locator("#messages")).to_contain_text("Guest 1: hello from the quick start")
    print("bob got: hello from the quick start")


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="quickstart-"))
    # Every default; the database lands in the working directory.
    server = start_server(workdir, log=workdir / "server.log")
    pages: dict[str, Page] = {}
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=need_browser(), args=CHROMIUM_ARGS)
            try:
                for name in ("alice", "bob"):
                    pages[name] = browser.new_context().new_page()
                    pages[name].set_default_timeout(TIMEOUT)
                run(pages)
            except Exception:
                ARTIFACTS.mkdir(exist_ok=True)
                for name, page in pages.items():
                    with contextlib.suppress(Exception):
                        page.screenshot(path=ARTIFACTS / f"quickstart-{name}.png")
                raise
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(30)
        print((workdir / "server.log").read_text(errors="replace"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
