"""Private rooms, calls both people are in, phone-sized screens, and screenshots of each.

What arrives through the signaling is recorded by an init script that wraps the page's
WebSocket (a test's eyes, not part of the client), as are its RTCPeerConnections (for
getStats()) and its getUserMedia streams (to see tracks stop). Screenshots of the start page, a
private room and a call, at 1280 and 360 px wide, go to $TEST_ARTIFACTS/screenshots
(default test-artifacts/screenshots, git-ignored) on every run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from realtools import need_module

need_module("playwright", "pip install -e '.[test]'")  # skip, or with CI set fail

from playwright.sync_api import Page, expect  # noqa: E402  (after the check above)

from .browserkit import ARTIFACTS, OpenPerson, Person, ServerProcess  # noqa: E402

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytestmark = pytest.mark.slow

SLOW = 60_000  # ms: WebRTC connections on a small, busy machine
SHOTS = Path(os.environ.get("TEST_ARTIFACTS") or ARTIFACTS) / "screenshots"
PHONE = {"width": 360, "height": 740}
DESKTOP = {"width": 1280, "height": 900}

# Records, before any script of the page runs, what the signaling socket delivers, every
# RTCPeerConnection, and every getUserMedia stream. With ignore_policy, it is also the
# "modified client" that gathers every kind of candidate whatever welcome said.
RECORDER = """
(() => {
  const ignorePolicy = %s;
  const frames = (window.__frames = []);
  const NativeWebSocket = window.WebSocket;
  window.WebSocket = class extends NativeWebSocket {
    constructor(...args) {
      super(...args);
      this.addEventListener('message', (event) => frames.push(event.data));
    }
  };
  const pcs = (window.__pcs = []);
  const NativePeerConnection = window.RTCPeerConnection;
  window.RTCPeerConnection = class extends NativePeerConnection {
    constructor(config = {}) {
      super(ignorePolicy ? { ...config, iceTransportPolicy: 'all' } : config);
      pcs.push(this);
    }
    setConfiguration(config) {
      super.setConfiguration(ignorePolicy ? { ...config, iceTransportPolicy: 'all' } : config);
    }
  };
  const streams = (window.__streams = []);
  const devices = navigator.mediaDevices;
  if (devices) {
    const getUserMedia = devices.getUserMedia.bind(devices);
    devices.getUserMedia = async (constraints) => {
      const stream = await getUserMedia(constraints);
      streams.push(stream);
      return stream;
    };
  }
})();
"""

SELECTED_PAIRS = """
async () => {
  const pairs = [];
  for (const pc of window.__pcs) {
    if (pc.connectionState !== 'connected') continue;
    const stats = await pc.getStats();
    stats.forEach((report) => {
      if (report.type !== 'transport' || !report.selectedCandidatePairId) return;
      const pair = stats.get(report.selectedCandidatePairId);
      pairs.push([
        stats.get(pair.localCandidateId).candidateType,
        stats.get(pair.remoteCandidateId).candidateType,
      ]);
    });
  }
  return pairs;
}
"""

# Local media: every track of every getUserMedia stream, and every sender's track.
MEDIA = """
() => ({
  tracks: window.__streams.flatMap((s) => s.getTracks()).map((t) => ({
    kind: t.kind, state: t.readyState, enabled: t.enabled })),
  sending: window.__pcs.filter((pc) => pc.signalingState !== 'closed')
    .flatMap((pc) => pc.getSenders()).filter((s) => s.track).length,
})
"""


def poll(page: Page, check: Callable[[], Any], what: str, timeout: float = SLOW / 1000) -> Any:
    """Wait until check() is truthy (evaluated in Python: the page's CSP forbids string eval)."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        page.wait_for_timeout(100)
    return result


def record(person: Person, *, ignore_policy: bool = False) -> Person:
    person.page.context.add_init_script(RECORDER % ("true" if ignore_policy else "false"))
    return person


def screenshot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SHOTS / f"{name}.png", full_page=True)


def received_candidates(page: Page) -> list[str]:
    """Every ICE candidate that reached this page through the signaling (trickled or in SDP)."""
    lines = []
    for text in page.evaluate("() => window.__frames"):
        message = json.loads(text)
        if message.get("type") != "signal" or not isinstance(message.get("data"), dict):
            continue
        data = message["data"]
        if isinstance(data.get("candidate"), dict) and data["candidate"].get("candidate"):
            lines.append(data["candidate"]["candidate"])
        if isinstance(data.get("description"), dict):
            sdp = data["description"].get("sdp") or ""
            lines += [line for line in sdp.splitlines() if line.startswith("a=candidate:")]
    return lines


def candidate_type(line: str) -> str:
    found = re.search(r" typ (\w+)", line)
    assert found, line
    return found.group(1)


def related_address(line: str) -> str | None:
    found = re.search(r" raddr (\S+)", line)
    return found.group(1) if found else None


def no_horizontal_scroll(page: Page) -> None:
    width, inner = page.evaluate("() => [document.scrollingElement.scrollWidth, window.innerWidth]")
    assert width <= inner, f"the page scrolls sideways: {width} > {inner}"


def buttons_reachable(page: Page) -> None:
    """Every visible button lies within the screen's width (so it can be scrolled to)."""
    inner = page.evaluate("() => window.innerWidth")
    for button in page.locator("button:visible, .button:visible").all():
        box = button.bounding_box()
        assert box is not None
        assert box["x"] >= 0 and box["x"] + box["width"] <= inner + 0.5, (button, box)


@pytest.fixture
def phone(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Callable[[str], Person]]:
    """A person on a phone-sized screen: Chromium's device emulation at 360 px wide."""
    contexts = []

    def open_phone(name: str) -> Person:
        context = browser.new_context(
            viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2
        )
        context.set_default_timeout(30_000)
        contexts.append(context)
        page = context.new_page()
        console: list[str] = []
        page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
        page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
        return Person(name, page, console)

    yield open_phone
    report = getattr(request.node, "report_call", None)
    for number, context in enumerate(contexts):
        if report is not None and report.failed:
            ARTIFACTS.mkdir(exist_ok=True)
            for page in context.pages:
                with contextlib.suppress(Exception):
                    page.screenshot(path=ARTIFACTS / f"{request.node.name}-phone{number}.png")
        with contextlib.suppress(Exception):
            context.close()


def create_room(
    page: Page, server: ServerProcess, *, private: bool, query: str = "", pin: bool = False
) -> str:
    page.goto(f"{server.url}/{query}")
    page.get_by_label("Protect it with a PIN").set_checked(pin)
    page.get_by_label(
        "Hide our IP addresses from each other (calls go through this server)"
    ).set_checked(private)
    page.get_by_role("button", name="Create a chat").click()
    link = page.get_by_label("Send this link to the other person")
    expect(link).to_have_value(re.compile(r"#room=[\w-]{22}$"))
    return link.input_value()


def join(page: Page, link: str, query: str = "") -> None:
    page.goto(link.replace("/#", f"/{query}#", 1))
    expect(page.locator("#room")).to_be_visible()


def expect_connected(page: Page, path: str) -> None:
    expect(page.locator("#status")).to_have_text("Connected to 1 person.", timeout=SLOW)
    expect(page.locator("#peers li")).to_contain_text(path, timeout=SLOW)


def test_private_room_shows_nobody_an_address(
    server: ServerProcess, people: OpenPerson, phone: Callable[[str], Person]
) -> None:
    """Relay only, on both sides: no host or srflx candidate ever reaches the other person.
    Bob is on a phone: the start page and the room at 360 px wide, checked and photographed."""
    alice, bob = record(people("alice")), record(phone("bob"))
    alice.page.set_viewport_size(DESKTOP)
    alice.page.goto(server.url)
    screenshot(alice.page, "start-1280")
    bob.page.goto(server.url)
    expect(bob.page.get_by_role("button", name="Create a chat")).to_be_visible()
    no_horizontal_scroll(bob.page)
    buttons_reachable(bob.page)
    screenshot(bob.page, "start-360")

    link = create_room(alice.page, server, private=True)
    expect(alice.page.locator("#room-private")).to_be_visible()
    join(bob.page, link)
    for person in (alice, bob):
        expect_connected(person.page, "private: relayed")
        expect(person.page.locator("#room-private")).to_be_visible()
        expect(person.page.locator("#peers li")).to_have_attribute("data-local", "relay")
    bob.page.get_by_role("textbox", name="Message").fill("hello from a phone")
    bob.page.get_by_role("button", name="Send", exact=True).click()
    expect(alice.page.locator("#messages")).to_contain_text("Guest 1: hello from a phone")

    for person in (alice, bob):
        # getStats(): the selected pair is relay on this side and, as this side sees it, on
        # the other side too.
        pairs = person.page.evaluate(SELECTED_PAIRS)
        assert pairs == [["relay", "relay"]], (person.name, pairs)
        received = received_candidates(person.page)
        assert received, f"{person.name} received no candidates at all"
        types = {candidate_type(line) for line in received}
        assert types == {"relay"}, (person.name, received)
        # Nor is an address of the other browser hidden in a relay candidate's related address.
        assert all(related_address(line) in (None, "0.0.0.0") for line in received), received
    no_horizontal_scroll(bob.page)
    buttons_reachable(bob.page)
    screenshot(alice.page, "private-room-1280")
    screenshot(bob.page, "private-room-360")


def test_a_client_ignoring_the_policy_learns_no_address(
    server: ServerProcess, people: OpenPerson
) -> None:
    """The protection is the honest browser's own policy: Mallory's client gathers host
    candidates regardless (and sends them), yet receives nothing but Alice's relay ones."""
    alice, mallory = record(people("alice")), record(people("mallory"), ignore_policy=True)
    link = create_room(alice.page, server, private=True, pin=True)
    pin = alice.page.locator("#pin-value").inner_text()
    mallory.page.goto(link)
    # check-chat said "private": the joining page tells before anyone joins.
    expect(mallory.page.locator("#join-private")).to_contain_text("This is a private chat")
    mallory.page.get_by_label("PIN", exact=True).fill(pin)
    mallory.page.get_by_role("button", name="Join").click()
    expect_connected(alice.page, "private: relayed")
    expect_connected(mallory.page, "relayed")
    expect(alice.page.locator("#peers li")).to_have_attribute("data-local", "relay")

    from_mallory = {candidate_type(line) for line in received_candidates(alice.page)}
    assert from_mallory - {"relay"}, f"the modified client sent only {from_mallory}"
    from_alice = received_candidates(mallory.page)
    assert from_alice, "mallory received no candidates at all"
    assert {candidate_type(line) for line in from_alice} == {"relay"}, from_alice
    assert all(related_address(line) in (None, "0.0.0.0") for line in from_alice), from_alice


def total_frames(page: Page) -> int:
    return int(
        page.locator("video.remote").evaluate("v => v.getVideoPlaybackQuality().totalVideoFrames")
    )


def test_call_ring_decline_accept_hang_up(
    server: ServerProcess, people: OpenPerson, phone: Callable[[str], Person]
) -> None:
    """Chromium's fake camera and microphone: a call rings, can be declined (no media flows),
    accepted (video decodes on both sides) and hung up (every track stops, on both sides)."""
    query = "?relay=1&turn=udp"  # all traffic through TURN on loopback
    alice, bob = record(people("alice")), record(phone("bob"))
    alice.page.set_viewport_size(DESKTOP)
    link = create_room(alice.page, server, private=False, query=query)
    join(bob.page, link, query)
    expect_connected(alice.page, "relayed")
    expect_connected(bob.page, "relayed")

    # Declined: Alice's camera is released and nothing was ever sent, either way.
    alice.page.get_by_role("button", name="Start call").click()
    incoming = bob.page.get_by_role("alertdialog")
    expect(incoming).to_contain_text("Guest 1 is calling")
    expect(alice.page.locator("#call-status")).to_have_text("Calling Guest 1…")
    incoming.get_by_role("button", name="Decline").click()
    expect(alice.page.get_by_role("alert")).to_have_text("Guest 1 declined the call.")
    expect(alice.page.locator("#call-area")).to_be_hidden()
    media = alice.page.evaluate(MEDIA)
    assert media["tracks"] and all(t["state"] == "ended" for t in media["tracks"]), media
    assert media["sending"] == 0, media
    assert bob.page.evaluate(MEDIA) == {"tracks": [], "sending": 0}  # never asked for a camera
    for person in (alice, bob):
        expect(person.page.locator("video.remote")).to_have_count(0)

    # Accepted: each side sees the other's video (frames keep decoding) large, itself small.
    alice.page.get_by_role("button", name="Start call").click()
    expect(incoming).to_contain_text("Guest 1 is calling")
    expect(incoming.get_by_role("button", name="Audio only")).to_be_visible()
    no_horizontal_scroll(bob.page)
    buttons_reachable(bob.page)
    screenshot(bob.page, "incoming-call-360")
    incoming.get_by_role("button", name="Join with camera and microphone").click()
    expect(incoming).to_be_hidden()
    for person in (alice, bob):
        page = person.page
        expect(page.locator("video.remote")).to_have_count(1, timeout=SLOW)
        first = poll(page, lambda page=page: total_frames(page), "a first decoded frame")
        poll(page, lambda page=page, first=first: total_frames(page) > first, "more frames")
        expect(page.locator("#call-status")).to_have_text("In a call with Guest 1.")
        remote = page.locator("video.remote").bounding_box()
        local = page.locator("#local-video").bounding_box()
        assert remote and local and local["width"] * 2 < remote["width"], (remote, local)
    no_horizontal_scroll(bob.page)
    buttons_reachable(bob.page)

    bob.page.get_by_role("button", name="Mute").click()
    bob.page.get_by_role("button", name="Camera off").click()
    tracks = {t["kind"]: t["enabled"] for t in bob.page.evaluate(MEDIA)["tracks"]}
    assert tracks == {"audio": False, "video": False}, tracks
    expect(bob.page.get_by_role("button", name="Unmute")).to_have_attribute("aria-pressed", "true")
    bob.page.get_by_role("button", name="Camera on").click()
    bob.page.get_by_role("button", name="Unmute").click()
    tracks = {t["kind"]: t["enabled"] for t in bob.page.evaluate(MEDIA)["tracks"]}
    assert tracks == {"audio": True, "video": True}, tracks
    screenshot(alice.page, "call-1280")
    screenshot(bob.page, "call-360")

    # Hung up by one: it ends for both.
    bob.page.get_by_role("button", name="Hang up").click()
    for person in (alice, bob):
        page = person.page

        def stopped(page: Page = page) -> bool:
            media = page.evaluate(MEDIA)
            return media["sending"] == 0 and all(t["state"] == "ended" for t in media["tracks"])

        poll(page, stopped, f"{person.name}'s tracks stopped")
        expect(page.locator("video.remote")).to_have_count(0, timeout=SLOW)
        expect(page.locator("#call-area")).to_be_hidden()
        expect(page.get_by_role("button", name="Start call")).to_be_enabled()
    expect(alice.page.get_by_role("alert")).to_have_text("Guest 1 hung up.")
    bob.page.get_by_role("textbox", name="Message").fill("still here after the call")
    bob.page.get_by_role("button", name="Send", exact=True).click()
    expect(alice.page.locator("#messages")).to_contain_text("still here after the call")
