"""GET /metrics after real traffic, parsed with prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
from pathlib import Path

import httpx
import pytest
import websockets
from aioice.stun import Class, Message, Method
from aioice.turn import create_turn_endpoint
from httpkit import Server
from prometheus_client.parser import text_string_to_metric_families

from p2pserver.metrics import Metrics
from peers import Echo, Inbox
from serverlog import Process, run_server

TIMEOUT = 30.0
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def start(tmp_path: Path, *extra: str) -> tuple[Process, str, int]:
    server = run_server(
        [
            "--http-host", "127.0.0.1", "--http-port", "0",
            "--turn-host", "127.0.0.1", "--turn-port", "0", "--no-self-test",
            "--user", "alice:secret", "--allow-peer", "127.0.0.0/8",
            "--db", str(tmp_path / "rooms.db"), *extra,
        ],
        tmp_path / "server.log",
    )  # fmt: skip
    base = (await server.wait_for(r"Uvicorn running on (http://127\.0\.0\.1:\d+)"))[1]
    turn = int((await server.wait_for(r"listening on udp 127\.0\.0\.1:(\d+)"))[1])
    return server, base, turn


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_metrics_count_real_traffic(tmp_path: Path, workers: str) -> None:
    """With 2 workers the counts are the sum of the worker processes' own."""
    server, base, turn_port = await start(tmp_path, "--turn-workers", workers)
    loop = asyncio.get_running_loop()
    echo, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    try:
        async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as http:
            room = (await http.post("/create-chat", json={"withPin": True})).json()
            assert (await http.get("/check-chat/nosuchroomnosuchroom00")).status_code == 404
            assert (await http.get("/no/such/page")).status_code == 404
            preflight = {"Origin": "https://chat.example", "Access-Control-Request-Method": "POST"}
            assert (await http.options("/create-chat", headers=preflight)).status_code == 200
            async with websockets.connect(f"ws://{base[7:]}/ws/{room['roomId']}") as ws:
                wrong = f"{(int(room['pin']) + 1) % 1_000_000:06d}"
                await ws.send(json.dumps({"type": "join", "pin": wrong}))
                assert json.loads(await ws.recv())["code"] == "wrong-pin"

            # A plain Binding request, which the UDP listener answers on its fast path.
            binding = Message(message_method=Method.BINDING, message_class=Class.REQUEST)
            stun_client, stun_inbox = await loop.create_datagram_endpoint(
                Inbox, remote_addr=("127.0.0.1", turn_port)
            )
            stun_client.sendto(bytes(binding))
            assert (await asyncio.wait_for(stun_inbox.queue.get(), TIMEOUT))[:2] == b"\x01\x01"
            stun_client.close()

            # A relayed round trip: the client's aioice allocation, a peer that echoes.
            relay, inbox = await create_turn_endpoint(
                Inbox,
                server_addr=("127.0.0.1", turn_port),
                username="alice",
                password="secret",
            )
            payloads = [b"x" * 10, b"y" * 100, b"z" * 1000]
            for payload in payloads:
                relay.sendto(payload, echo.get_extra_info("sockname"))
                assert await asyncio.wait_for(inbox.queue.get(), TIMEOUT) == b"echo " + payload
            before = parse((await http.get("/metrics")).text)
            relay.close()
            await asyncio.sleep(0)  # the close is a task; the counters must not go down after it
            deadline = loop.time() + TIMEOUT
            while True:
                after = parse((await http.get("/metrics")).text)
                if value(after, "turn_total_allocations") == 0 or loop.time() > deadline:
                    break
                await asyncio.sleep(0.05)
    finally:
        echo.close()
        assert server.stop() == 0

    sent = sum(map(len, payloads))
    for samples in (before, after):  # counters only go up: the same once the allocation ended
        assert value(samples, "turn_total_traffic_peer_sentp_total") == 3
        assert value(samples, "turn_total_traffic_peer_sentb_total") == sent
        assert value(samples, "turn_total_traffic_peer_rcvp_total") == 3
        assert value(samples, "turn_total_traffic_peer_rcvb_total") == sent + 3 * len(b"echo ")
        assert value(samples, "turn_new_allocation_total") == 1
        assert value(samples, "p2pserver_turn_challenges_total") == 1  # aioice's first Allocate
        assert value(samples, "p2pserver_turn_error_responses_total", code="401") == 1
        assert value(samples, "p2pserver_turn_requests_total", method="allocate", transport="udp")
    binding = {"method": "binding", "transport": "udp"}
    assert value(after, "p2pserver_turn_requests_total", **binding) == 1
    assert value(before, "turn_total_allocations") == 1
    assert value(before, "p2pserver_turn_permissions") == 1
    assert value(before, "p2pserver_turn_channels") == 1
    assert value(after, "turn_total_allocations") == 0
    assert value(after, "turn_deleted_allocation_total") == 1

    def http(route: str, method: str, status: str) -> float:
        return value(
            after, "p2pserver_http_requests_total", route=route, method=method, status=status
        )

    assert http("/create-chat", "POST", "200") == 1
    assert http("/check-chat/{room_id}", "GET", "404") == 1  # a template, never a room id
    assert http("other", "GET", "404") == 1
    assert http("preflight", "OPTIONS", "200") == 1  # answered by CORS, before any route
    assert http("/metrics", "GET", "200") >= 1
    assert value(after, "p2pserver_create_chat_total", result="created") == 1
    assert value(after, "p2pserver_signaling_messages_total", type="join") == 1
    assert value(after, "p2pserver_signaling_join_failures_total", reason="wrong-pin") == 1
    assert value(after, "process_resident_memory_bytes") > 0


async def test_metrics_refused_to_addresses_not_allowed(tmp_path: Path) -> None:
    server, base, _ = await start(tmp_path, "--metrics-allow", "192.0.2.0/24")
    try:
        async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as http:
            response = await http.get("/metrics")
    finally:
        assert server.stop() == 0
    assert response.status_code == 403
    assert response.json()["error"] == "forbidden"


async def test_metrics_count_pin_lockouts_and_refused_frames(tmp_path: Path) -> None:
    server, base, _ = await start(tmp_path, "--pin-attempts", "2")
    try:
        async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as http:
            room = (await http.post("/create-chat", json={"withPin": True})).json()
            wrong = f"{(int(room['pin']) + 1) % 1_000_000:06d}"
            codes = []
            for _ in range(3):
                async with websockets.connect(f"ws://{base[7:]}/ws/{room['roomId']}") as ws:
                    await ws.send("not json")  # refused, not fatal: counted as invalid
                    assert json.loads(await ws.recv())["code"] == "bad-message"
                    await ws.send(json.dumps({"type": "join", "pin": wrong}))
                    codes.append(json.loads(await ws.recv())["code"])
            samples = parse((await http.get("/metrics")).text)
    finally:
        assert server.stop() == 0
    assert codes == ["wrong-pin", "wrong-pin", "too-many-attempts"]
    # The third attempt found the room locked out (checked first) and was refused.
    assert value(samples, "p2pserver_pin_lockouts_total", scope="room") == 1
    assert value(samples, "p2pserver_signaling_messages_total", type="invalid") == 3
    assert value(samples, "p2pserver_signaling_messages_total", type="join") == 3
    assert value(samples, "p2pserver_signaling_join_failures_total", reason="wrong-pin") == 2
    failures = value(samples, "p2pserver_signaling_join_failures_total", reason="too-many-attempts")
    assert failures == 1
    assert samples[("p2pserver_rooms_lost_total", frozenset())] == 0  # every create landed


async def test_counters_do_not_go_down_when_a_worker_dies(tmp_path: Path) -> None:
    server, base, turn_port = await start(tmp_path, "--turn-workers", "2")
    relays = []
    try:
        # Allocations from several client ports: the kernel's hash spreads them over both workers.
        for _ in range(8):
            relay, _ = await create_turn_endpoint(
                Inbox, server_addr=("127.0.0.1", turn_port), username="alice", password="secret"
            )
            relays.append(relay)
        async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as http:
            workers = (await http.get("/healthz")).json()["turn"]["workers"]
            victim = max(workers, key=lambda worker: worker["allocations"])
            assert victim["allocations"] > 0
            before = parse((await http.get("/metrics")).text)
            os.kill(victim["pid"], signal.SIGKILL)
            deadline = asyncio.get_running_loop().time() + TIMEOUT
            while True:  # until the supervisor has noticed and restarted it
                workers = (await http.get("/healthz")).json()["turn"]["workers"]
                restarted = next(w for w in workers if w["worker"] == victim["worker"])
                if restarted["restarts"] == 1 and restarted["alive"]:
                    break
                assert asyncio.get_running_loop().time() < deadline, workers
                await asyncio.sleep(0.1)
            after = parse((await http.get("/metrics")).text)
    finally:
        for relay in relays:
            relay.close()
        assert server.stop() == 0
    counters = [
        key
        for key in before
        if key[0].endswith("_total") and key[0].startswith(("turn", "p2pserver_turn"))
    ]
    assert value(before, "turn_new_allocation_total") == 8
    for key in counters:  # the dead worker's counts stay in the totals
        assert after.get(key, 0.0) >= before[key], key
    assert value(after, "turn_total_allocations") == 8 - victim["allocations"]


def test_metrics_access_by_address() -> None:
    metrics = Metrics([ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")])
    assert metrics.allowed("127.0.0.1") and metrics.allowed("::1")
    assert metrics.allowed("::ffff:127.0.0.1")  # an IPv4 client on a dual-stack socket
    assert not metrics.allowed("192.0.2.1") and not metrics.allowed("::ffff:192.0.2.1")
    assert not metrics.allowed("unix-socket") and not metrics.allowed(None)


async def test_rooms_lost_are_the_stores_count(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """p2pserver_rooms_lost_total is what the room store counted (docs/operations.md)."""
    store = server.app.state.hub.store.store
    monkeypatch.setattr(store, "lost", 3)
    async with server.client() as http:
        samples = parse((await http.get("/metrics")).text)
    assert samples[("p2pserver_rooms_lost_total", frozenset())] == 3
