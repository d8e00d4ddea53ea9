"""Two people in one room, each on a different p2pserver instance that shares rooms through Redis
(issue 11): the room, the PIN and the signaling cross instances, and each browser relays through
its own instance's TURN server."""

from __future__ import annotations

import pytest

from realtools import need_module
from rediskit import RedisServer
from rediskit import redis_server as redis_server  # a fixture: a real redis-server

need_module("playwright", "pip install -e '.[test]'")  # skip, or with CI set fail

from playwright.sync_api import expect  # noqa: E402  (after the check above)

from .browserkit import OpenPerson, ServerFactory  # noqa: E402
from .test_web_client import create_chat, enter_pin, expect_connected, open_link, send_text  # noqa: E402

pytestmark = pytest.mark.slow


def test_people_on_two_instances_chat_through_the_relay(
    make_server: ServerFactory, people: OpenPerson, redis_server: RedisServer
) -> None:
    fleet = ("--redis", redis_server.url)
    first, second = make_server(extra=fleet), make_server(extra=fleet)
    query = "?relay=1&turn=udp"
    alice, bob = people("alice"), people("bob")
    link, pin = create_chat(alice, first, pin=True, query=query)
    # Bob follows the same link to the other instance, as a load balancer might send him.
    page = open_link(bob, link.replace(first.url, second.url, 1), query)
    enter_pin(page, pin)
    for person in (alice, bob):
        expect_connected(person.page, "relayed through the server (TURN over UDP)")
    send_text(alice.page, "hello from the first instance")
    expect(bob.page.locator("#messages")).to_contain_text("Guest 1: hello from the first instance")
    send_text(bob.page, "and hello from the second")
    expect(alice.page.locator("#messages")).to_contain_text("Guest 1: and hello from the second")
    # Each browser took its iceServers, so its TURN server, from its own instance: both relay.
    for server in (first, second):
        assert "allocation 127.0.0.1:" in server.log(), server.log()
