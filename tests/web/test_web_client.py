"""The reference web client in Chromium, used as people would: click, type, pick files.

Every page is opened with `?relay=1`, so Chromium offers only TURN relay candidates on
127.0.0.1 and all traffic stays on loopback (and goes through the built-in TURN server).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import urllib.request
from pathlib import Path

import pytest

from realtools import need_module

need_module("playwright", "pip install -e '.[test]'")  # skip, or with CI set fail

from playwright.sync_api import Page, expect  # noqa: E402  (after the check above)

from .browserkit import OpenPerson, Person, ServerFactory, ServerProcess  # noqa: E402

pytestmark = pytest.mark.slow

SLOW = 60_000  # ms: for WebRTC connections and transfers on a small, busy machine
FILE_SIZE = 6 * 1024 * 1024 + 12_345  # over HIGH_WATER: backpressure must act
HIGH_WATER = 2 * 1024 * 1024  # p2pchat.js pauses sending above this


def create_chat(person: Person, server: ServerProcess, *, pin: bool, query: str) -> tuple[str, str]:
    """Create a chat on the start page; returns (the link to share, the PIN or '')."""
    page = person.page
    page.goto(f"{server.url}/{query}")
    page.get_by_label("Protect it with a PIN").set_checked(pin)
    page.get_by_role("button", name="Create a chat").click()
    link = page.get_by_label("Send this link to the other person")
    expect(link).to_have_value(re.compile(r"^http://127\.0\.0\.1:\d+/#room=[\w-]{22}$"))
    expect(page.locator("#status")).to_contain_text("Waiting for the other person")
    pin_text = ""
    if pin:
        expect(page.locator("#pin-value")).to_have_text(re.compile(r"^\d{6}$"))
        pin_text = page.locator("#pin-value").inner_text()
    else:
        expect(page.locator("#share-pin")).to_be_hidden()
    return link.input_value(), pin_text


def open_link(person: Person, link: str, query: str) -> Page:
    """Open a shared link, with test options in the query string (the room is in the #)."""
    person.page.goto(link.replace("/#", f"/{query}#", 1))
    return person.page


def enter_pin(page: Page, pin: str) -> None:
    page.get_by_label("PIN", exact=True).fill(pin)
    page.get_by_role("button", name="Join").click()


def expect_connected(page: Page, path: str) -> None:
    expect(page.locator("#status")).to_have_text("Connected to 1 person.", timeout=SLOW)
    expect(page.locator("#peers li")).to_contain_text(path, timeout=SLOW)


def send_text(page: Page, text: str) -> None:
    page.get_by_role("textbox", name="Message").fill(text)
    page.get_by_role("button", name="Send", exact=True).click()


def pick_file(page: Page, path: Path) -> None:
    with page.expect_file_chooser() as chooser:
        page.get_by_text("Send a file").click()
    chooser.value.set_files(str(path))


@pytest.mark.parametrize(
    ("transport", "sender"), [("udp", "alice"), ("tcp", "bob")], ids=["turn-udp", "turn-tcp"]
)
def test_pin_chat_text_and_file_through_turn(
    server: ServerProcess, people: OpenPerson, tmp_path: Path, transport: str, sender: str
) -> None:
    query = f"?relay=1&turn={transport}"
    alice, bob = people("alice"), people("bob")
    link, pin = create_chat(alice, server, pin=True, query=query)

    page = open_link(bob, link, query)
    expect(page.get_by_role("heading", name="Join the chat")).to_be_visible()
    enter_pin(page, pin)

    # Both see the other, relayed, and over the transport the test forced.
    path = f"relayed through the server (TURN over {transport.upper()})"
    for person in (alice, bob):
        expect_connected(person.page, path)
        expect(person.page.locator("#peers li")).to_have_attribute("data-path", "relayed")

    send_text(alice.page, "hello bob, it's alice")
    expect(bob.page.locator("#messages")).to_contain_text("Guest 1: hello bob, it's alice")
    send_text(bob.page, "hi alice <b>not bold</b>")
    expect(alice.page.locator("#messages")).to_contain_text("Guest 1: hi alice <b>not bold</b>")
    expect(alice.page.locator("#messages b")).to_have_count(0)  # text, never markup

    data = random.Random(FILE_SIZE).randbytes(FILE_SIZE)
    source = tmp_path / "holiday photos.bin"
    source.write_bytes(data)
    sending, receiving = (alice, bob) if sender == "alice" else (bob, alice)
    pick_file(sending.page, source)

    received = receiving.page.locator("#messages li.file.in")
    expect(received).to_contain_text("holiday photos.bin (6.3 MB)")
    expect(received).to_have_attribute("data-state", "done", timeout=SLOW)
    expect(received).to_have_attribute("data-verified", "true")
    expect(received).to_contain_text("SHA-256 checked")
    expect(received.locator("progress")).to_have_js_property("value", FILE_SIZE)
    sent = sending.page.locator("#messages li.file.out")
    expect(sent).to_have_attribute("data-state", "done", timeout=SLOW)
    expect(sent).to_have_attribute("data-verified", "true")
    # The sender never queued much more than HIGH_WATER: it waited for bufferedamountlow.
    peak = int(sent.get_attribute("data-peak-buffered") or -1)
    assert 0 <= peak <= HIGH_WATER + 64 * 1024, peak

    # The bytes a person saves are the bytes that were sent.
    with receiving.page.expect_download() as download:
        received.get_by_role("link", name="Save holiday photos.bin").click()
    assert download.value.suggested_filename == "holiday photos.bin"
    saved = Path(download.value.path()).read_bytes()
    assert hashlib.sha256(saved).hexdigest() == hashlib.sha256(data).hexdigest()


def test_wrong_pin_is_refused_then_the_right_one_joins(
    server: ServerProcess, people: OpenPerson
) -> None:
    alice, mallory = people("alice"), people("mallory")
    link, pin = create_chat(alice, server, pin=True, query="?relay=1")
    page = open_link(mallory, link, "?relay=1")
    wrong = f"{(int(pin) + 1) % 1_000_000:06d}"
    enter_pin(page, wrong)
    expect(page.locator("#pin-error")).to_have_text("Wrong PIN. Check it and try again.")
    expect(page.locator("#room")).to_be_hidden()
    expect(alice.page.locator("#status")).to_contain_text("Waiting for the other person")

    enter_pin(page, pin)
    expect_connected(page, "relayed")
    expect_connected(alice.page, "relayed")


def test_third_person_sees_room_full(server: ServerProcess, people: OpenPerson) -> None:
    alice, bob, carol = people("alice"), people("bob"), people("carol")
    link, _ = create_chat(alice, server, pin=False, query="?relay=1")
    open_link(bob, link, "?relay=1")  # no PIN: the link alone joins
    expect_connected(bob.page, "relayed")

    page = open_link(carol, link, "?relay=1")
    expect(page.get_by_role("alert")).to_have_text(
        "This chat is full: the people it was made for are already in it."
    )
    expect(page.locator("#room")).to_be_hidden()
    expect_connected(alice.page, "relayed")  # the two in the room are undisturbed


def test_peer_closing_the_page_is_shown_as_left(server: ServerProcess, people: OpenPerson) -> None:
    alice, bob = people("alice"), people("bob")
    link, _ = create_chat(alice, server, pin=False, query="?relay=1")
    open_link(bob, link, "?relay=1")
    expect_connected(alice.page, "relayed")

    bob.page.close()
    expect(alice.page.get_by_role("alert")).to_have_text("Guest 1 left the chat.")
    expect(alice.page.locator("#messages")).to_contain_text("Guest 1 left the chat.")
    expect(alice.page.locator("#status")).to_contain_text("Waiting for the other person")
    expect(alice.page.get_by_role("textbox", name="Message")).to_be_disabled()


def test_lost_server_connection_is_shown(make_server: ServerFactory, people: OpenPerson) -> None:
    server = make_server()
    alice = people("alice")
    create_chat(alice, server, pin=True, query="?relay=1")
    assert server.terminate() == 0
    expect(alice.page.get_by_role("alert")).to_contain_text(
        "Lost the connection to the chat server (the server is restarting)"
    )
    expect(alice.page.locator("#status")).to_have_text("Disconnected from the server.")


def test_failed_ice_is_shown(make_server: ServerFactory, people: OpenPerson) -> None:
    """With the production peer policy, TURN will not relay between two loopback candidates:
    relay-only browsers on one host then have no path at all."""
    server = make_server(relay_to_loopback=False)
    alice, bob = people("alice"), people("bob")
    link, _ = create_chat(alice, server, pin=False, query="?relay=1")
    open_link(bob, link, "?relay=1")
    for person in (alice, bob):
        expect(person.page.get_by_role("alert")).to_contain_text(
            "The connection to Guest 1 failed: no direct or relayed path was found (ICE failed)",
            timeout=SLOW * 2,
        )
        expect(person.page.locator("#peers li")).to_have_attribute("data-state", "failed")
    expect(alice.page.get_by_role("textbox", name="Message")).to_be_disabled()


def test_unknown_room_link_says_so(server: ServerProcess, people: OpenPerson) -> None:
    page = people("alice").page
    page.goto(f"{server.url}/?relay=1#room=AAAAAAAAAAAAAAAAAAAAAA")
    expect(page.get_by_role("alert")).to_contain_text("This chat does not exist or has expired")
    expect(page.get_by_role("button", name="Create a chat")).to_be_visible()


def test_three_people_in_a_mesh(server: ServerProcess, people: OpenPerson) -> None:
    """Rooms for more than two (maxPeers, through the API): everyone connects to everyone."""
    request = urllib.request.Request(
        f"{server.url}/create-chat",
        data=json.dumps({"maxPeers": 3}).encode(),
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as response:
        room_id = json.load(response)["roomId"]
    trio = [people(name) for name in ("alice", "bob", "carol")]
    for person in trio:  # one after the other: each newcomer calls everyone already there
        open_link(person, f"{server.url}/#room={room_id}", "?relay=1")
        expect(person.page.locator("#room")).to_be_visible()
    for person in trio:
        expect(person.page.locator("#status")).to_have_text("Connected to 2 people.", timeout=SLOW)
        expect(person.page.locator("#peers li[data-path=relayed]")).to_have_count(2, timeout=SLOW)

    send_text(trio[2].page, "hello both of you")
    for person in trio[:2]:
        expect(person.page.locator("#messages")).to_contain_text(": hello both of you")


def test_without_crypto_subtle_files_arrive_unchecked(
    server: ServerProcess, people: OpenPerson, tmp_path: Path
) -> None:
    """Plain HTTP on a name other than localhost has no crypto.subtle: say so, keep working."""
    alice, bob = people("alice"), people("bob")
    # What an insecure context looks like to the page (127.0.0.1 itself is a secure one).
    bob.page.context.add_init_script(
        "Object.defineProperty(crypto, 'subtle', { get: () => undefined })"
    )
    link, _ = create_chat(alice, server, pin=False, query="?relay=1")
    page = open_link(bob, link, "?relay=1")
    expect_connected(page, "relayed")
    expect(page.locator("#insecure")).to_be_visible()
    expect(page.locator("#insecure")).to_contain_text("cannot be integrity-checked")
    expect(alice.page.locator("#insecure")).to_be_hidden()

    data = random.Random(1).randbytes(200_000)
    source = tmp_path / "notes.txt"
    source.write_bytes(data)
    pick_file(alice.page, source)
    received = page.locator("#messages li.file.in")
    expect(received).to_have_attribute("data-state", "done", timeout=SLOW)
    expect(received).to_have_attribute("data-verified", "unverified")
    expect(received).to_contain_text("not checked")
    expect(alice.page.locator("#messages li.file.out")).to_have_attribute(
        "data-verified", "unverified", timeout=SLOW
    )
    with page.expect_download() as download:
        received.get_by_role("link", name="Save notes.txt").click()
    assert Path(download.value.path()).read_bytes() == data
