"""The connection check page (/check) in Chromium, on two networks.

On plain loopback every advertised relay works and STUN answers: "Calls will work from this
network". In a network namespace whose firewall drops UDP to the TURN port (as
tests/cli/test_check.py does for `p2pserver check`), the page says that STUN and the relay over
UDP failed, that the relay over TCP works, and that calls work only through the relay.
Screenshots at 1280 and 360 px wide go to test-artifacts/ on every run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .browserkit import ARTIFACTS, OpenPerson, ServerFactory, ServerProcess, need_browser

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
TIMEOUT = 60_000  # the page's verdict is bounded at 10 s; this is for a slow, shared machine


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI needs this test's tools: {reason}")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _chromium_required() -> Iterator[None]:
    """Autouse fixtures come first: under CI a missing browser fails here, before the
    `server` and `browser` fixtures would skip."""
    need_browser()  # skips, or with CI set fails, naming what is missing (tests/realtools.py)
    yield


def _no_horizontal_scroll(page: Page) -> None:
    scroll, inner = page.evaluate("[document.documentElement.scrollWidth, innerWidth]")
    assert scroll <= inner, f"page is {scroll} px wide in a {inner} px window"


def test_check_page_on_loopback_says_calls_will_work(
    server: ServerProcess, people: OpenPerson
) -> None:
    from playwright.sync_api import expect

    checker = people("checker")
    page = checker.page
    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(server.url)
    page.get_by_role("link", name="Check your connection").click()
    page.wait_for_url(f"{server.url}/check")
    expect(page.get_by_role("heading", name="Check your connection")).to_be_visible()

    # The page may first say less (a slow machine), and then more once gathering completes.
    expect(page.locator("#verdict-box")).to_have_attribute("data-verdict", "ok", timeout=TIMEOUT)
    expect(page.get_by_role("status")).to_have_text("Calls will work from this network.")
    # No --tls-cert: TURN over TLS is not advertised, and the page says so.
    states = {"host": "works", "srflx": "works", "relay-udp": "works", "relay-tcp": "works"}
    states["relay-tls"] = "absent"
    for row, state in states.items():
        expect(page.locator(f"#{row}")).to_have_attribute("data-state", state)
    assert page.locator("#results li").count() == len(states)
    for protocol in ("udp", "tcp"):
        row = page.locator(f"#relay-{protocol}")
        expect(row).to_contain_text("Relayed address 127.0.0.1:")
        expect(row).to_contain_text("round trip through the relay")
        assert float(row.get_attribute("data-rtt-ms") or "nan") >= 0
    expect(page.locator("#problems")).to_be_hidden()
    # The page ran under its strict Content-Security-Policy without a complaint.
    assert not [line for line in checker.console if line.startswith(("error", "pageerror"))], (
        checker.console
    )

    ARTIFACTS.mkdir(exist_ok=True)
    for width, height in ((1280, 900), (360, 800)):
        page.set_viewport_size({"width": width, "height": height})
        _no_horizontal_scroll(page)
        page.screenshot(path=ARTIFACTS / f"check-page-{width}.png", full_page=True)


def test_check_page_says_no_relay_when_nothing_comes_through_it(
    make_server: ServerFactory, people: OpenPerson
) -> None:
    """The production peer policy refuses loopback peers, and the browser's relayed addresses are
    on loopback here: allocations work, relaying between them does not."""
    from playwright.sync_api import expect

    server = make_server(relay_to_loopback=False)
    page = people("checker").page
    page.goto(f"{server.url}/check")
    expect(page.locator("#verdict-box")).to_have_attribute(
        "data-verdict", "no-relay", timeout=TIMEOUT
    )
    expect(page.get_by_role("status")).to_have_text("No relay: calls will fail behind strict NATs.")
    expect(page.locator("#verdict-detail")).to_contain_text("Calls can still connect directly")
    for protocol in ("udp", "tcp"):
        row = page.locator(f"#relay-{protocol}")
        expect(row).to_have_attribute("data-state", "failed")
        expect(row).to_contain_text("Relayed address 127.0.0.1:")
        expect(row).to_contain_text("but nothing came through the relay")
        expect(row).to_contain_text("p2pserver check")
    expect(page.locator("#srflx")).to_have_attribute("data-state", "works")


def test_check_page_says_only_through_the_relay_when_udp_is_blocked(tmp_path: Path) -> None:
    """In a network namespace of its own, a firewall drops UDP to 3478; TCP still works."""
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("unshare", "ip", "iptables")):
        _missing("needs root, unshare, ip and iptables for a network namespace with a firewall")
    script = (
        "ip link set lo up && iptables -A INPUT -p udp --dport 3478 -j DROP && "
        f'exec "{sys.executable}" "{HERE / "blocked_check_page.py"}" "{tmp_path}"'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2P_")}
    env["PYTHONPATH"] = str(HERE.parent)  # for netkit, as pytest's pythonpath gives the tests
    # --fork --kill-child: if this test times out, nothing is left running in the namespace.
    result = subprocess.run(
        ["unshare", "--net", "--fork", "--kill-child", "--", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output
    lines = result.stdout.splitlines()

    def shown(prefix: str) -> str:
        found = [text for text in lines if text.startswith(prefix)]
        assert len(found) == 1, output
        return found[0]

    # As soon as the verdict is there (bounded by the page at 10 s):
    assert shown("first verdict ") == (
        "first verdict relay-only: Calls will work, but only through the relay."
    ), output
    assert shown("first srflx ").startswith("first srflx failed: "), output
    assert "UDP to the server may be blocked" in shown("first srflx "), output
    assert shown("first relay-udp ").startswith("first relay-udp failed: No relayed address."), (
        output
    )
    tcp = shown("first relay-tcp ")
    assert tcp.startswith("first relay-tcp works: ") and "round trip through the relay" in tcp
    assert shown("first relay-tls ").startswith("first relay-tls absent: "), output
    # Later, the browser's own reason for each URL that never answered (icecandidateerror).
    assert "The browser says: turn:127.0.0.1:3478?transport=udp: " in shown("final relay-udp "), (
        output
    )
    assert "The browser says: stun:127.0.0.1:3478: " in shown("final srflx "), output
    assert any(text.startswith("final error turn:127.0.0.1:3478?transport=udp: ") for text in lines)
    assert shown("final verdict ").startswith("final verdict relay-only: "), output
    scroll, inner = (int(n) for n in shown("width at 360: ").split(": ")[1].split(" of "))
    assert scroll <= inner, output
