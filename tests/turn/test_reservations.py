"""RESERVATION-TOKENs that any TURN worker can take (relay.SharedRelayPorts, docs/turn.md): what a
token is refused for. The path that takes one on another worker is in test_workers.py."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from p2pserver.turn import relay
from p2pserver.turn.relay import SharedRelayPorts

KEY = b"k" * 32
SLICE, WHOLE = (50000, 50009), (50000, 50019)


async def test_tokens_expire_are_not_replayed_and_name_only_ports_of_the_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ports = SharedRelayPorts(
        {1: "127.0.0.1"}, SLICE, asyncio.get_running_loop(), token_key=KEY, whole_range=WHOLE
    )
    issued = time.time()
    wall = [issued]
    monkeypatch.setattr(
        relay, "time", SimpleNamespace(time=lambda: wall[0], monotonic=time.monotonic)
    )
    first, token = ports.open(1, even_port=True, reserve_next=True, dont_fragment=False)
    first.close()
    assert token is not None

    wall[0] = issued + relay.RESERVATION_LIFETIME + 1
    assert ports.take_reserved(token) is None  # too late
    wall[0] = issued + 2**15  # the 15-bit stamp has wrapped: looks fresh, is not
    assert ports.take_reserved(token) is None
    wall[0] = issued + 1
    assert ports.take_reserved(token[:4] + bytes(4)) is None  # a forged MAC
    assert ports.take_reserved(ports._token(1, 60000, wall[0])) is None  # outside the range
    assert ports.take_reserved(ports._token(2, 50001, wall[0])) is None  # no IPv6 relays here
    taken = ports.take_reserved(token)
    assert taken is not None
    try:
        assert taken.sock.getsockname()[1] == int.from_bytes(token[:2], "big")
    finally:
        taken.close()


async def test_a_token_is_good_once_even_after_its_relay_closed() -> None:
    ports = SharedRelayPorts(
        {1: "127.0.0.1"}, SLICE, asyncio.get_running_loop(), token_key=KEY, whole_range=WHOLE
    )
    first, token = ports.open(1, even_port=True, reserve_next=True, dont_fragment=False)
    first.close()
    assert token is not None
    taken = ports.take_reserved(token)
    assert taken is not None
    taken.close()  # the port is free again: the token still must not open it twice
    assert ports.take_reserved(token) is None
    assert ports.next_deadline() is not None
    ports.expire(time.monotonic() + relay.RESERVATION_LIFETIME + 1)
    assert ports.taken == {} and ports.held == {}


async def test_a_relay_address_the_host_lacks_is_no_capacity_not_a_crash() -> None:
    ports = relay.RelayPorts(
        {1: "127.0.0.1", 2: "2001:db8::1"}, SLICE, asyncio.get_running_loop()
    )  # 2001:db8::/32 is for documentation: no host has it
    with pytest.raises(relay.NoCapacity, match="2001:db8::1"):
        ports.open(2, even_port=False, reserve_next=False, dont_fragment=False)
