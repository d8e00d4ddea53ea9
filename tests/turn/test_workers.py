"""TURN worker processes (`--turn-workers 2`): restarts, steering, quotas, stats, shutdown.

Every server here is a real `p2pserver` process on 127.0.0.1 with port 0; which worker holds an
allocation is read from its relayed port (each worker owns a slice of the relay range), and the
workers' pids from the log. Waits wait for the event (a log line, a pid gone), with deadlines.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aioice.stun import Method
from processkit import ServerProcess
from stunclient import StunClient

from netns import need_netns, run_in_netns
from p2pserver.turn.workers import shares, slices
from serverlog import wait_until

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
LOCALHOST = "127.0.0.1"
RELAY_PORTS = (49152, 65535)  # the default range, cut in two
SLICES = slices(RELAY_PORTS, 2)
TIMEOUT = 20.0
BASE_ARGS = (
    *("--no-http", "--turn-host", LOCALHOST, "--turn-port", "0", "--turn-workers", "2"),
    *("--user", "alice:wonderland", "--user", "bob:builder", "--allow-peer", "127.0.0.0/8"),
    "--no-self-test",
)
WORKER_LINE = re.compile(r"TURN worker (\d+) \(pid (\d+)\) serving")


def worker_of(port: int) -> int:
    return next(i for i, (low, high) in enumerate(SLICES) if low <= port <= high)


def worker_pids(server: ServerProcess) -> dict[int, int]:
    """The latest pid of each worker, from its `serving` log line."""
    return {int(m[1]): int(m[2]) for m in WORKER_LINE.finditer(server.text())}


def gone(pid: int) -> bool:
    """The process has ended (or is a zombie waiting to be reaped by whoever adopted it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.fixture
async def servers() -> AsyncIterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        await server.stop()


async def start(servers: list[ServerProcess], *extra: str) -> ServerProcess:
    server = await ServerProcess.start(*BASE_ARGS, *extra)
    servers.append(server)
    await wait_until(lambda: len(worker_pids(server)) == 2, what="both workers to say they serve")
    return server


async def allocate(port: int, user: str = "bob", password: str = "builder") -> StunClient:
    client = await StunClient.connect((LOCALHOST, port))
    await client.login(user, password)
    return client


async def on_each_worker(port: int, user: str = "bob", password: str = "builder") -> dict:
    """One client with an allocation on each worker: {worker: (client, relayed address)}."""
    found: dict[int, tuple[StunClient, tuple[str, int]]] = {}
    for _ in range(60):
        client = await allocate(port, user, password)
        response = await client.allocate()
        assert response.error_code is None, response
        relayed = response.attributes["XOR-RELAYED-ADDRESS"]
        worker = worker_of(relayed[1])
        if worker in found:
            await client.request(Method.REFRESH, {"LIFETIME": 0})
            client.close()
            continue
        found[worker] = (client, relayed)
        if len(found) == 2:
            return found
    raise AssertionError("60 clients all hashed to one worker")


async def sockets_by_worker(port: int, wanted: dict[int, int]) -> dict[int, list[StunClient]]:
    """Logged-in clients whose 5-tuples the kernel steers to each worker, `wanted[w]` of each:
    found by allocating as bob (whose quota is not under test) and deleting again."""
    found: dict[int, list[StunClient]] = {w: [] for w in wanted}
    for _ in range(120):
        if all(len(found[w]) >= n for w, n in wanted.items()):
            return found
        client = await allocate(port)
        response = await client.allocate()
        assert response.error_code is None, response
        worker = worker_of(response.attributes["XOR-RELAYED-ADDRESS"][1])
        assert (await client.request(Method.REFRESH, {"LIFETIME": 0})).error_code is None
        if len(found[worker]) < wanted[worker]:
            found[worker].append(client)
        else:
            client.close()
    raise AssertionError(f"not enough clients on each worker: {found}")


class Peer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr[:2]))


async def round_trip(
    client: StunClient, relayed: tuple[str, int], peer: Peer, transport: Any, n: int
) -> None:
    """Client -> peer on channel 0x4000 and back; neither datagram may be lost."""
    payload = b"ping %d" % n
    client.send_channel_data(0x4000, payload)
    data, source = await asyncio.wait_for(peer.queue.get(), TIMEOUT)
    assert (data, source) == (payload, relayed)
    transport.sendto(b"pong %d" % n, relayed)
    raw = await client.receive(TIMEOUT)
    assert raw[:2] == b"\x40\x00" and raw[4:] == b"pong %d" % n, raw


async def test_a_killed_worker_is_restarted_and_the_others_keep_relaying(
    servers: list[ServerProcess],
) -> None:
    server = await start(servers)
    clients = await on_each_worker(server.port)
    (victim, victim_relayed), (survivor, survivor_relayed) = clients[0], clients[1]
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(Peer, local_addr=(LOCALHOST, 0))
    peer_addr = transport.get_extra_info("sockname")[:2]
    try:
        for client in (victim, survivor):
            bound = await client.request(
                Method.CHANNEL_BIND, {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": peer_addr}
            )
            assert bound.error_code is None, bound
        await round_trip(victim, victim_relayed, peer, transport, 0)

        old = worker_pids(server)
        # The survivor relays in lock step all along; the kill falls in the middle.
        for n in range(60):
            if n == 20:
                os.kill(old[0], signal.SIGKILL)
            await round_trip(survivor, survivor_relayed, peer, transport, n)
        await wait_until(lambda: "TURN worker 0 restarted" in server.text(), what="the restart")
        new = worker_pids(server)
        assert new[0] != old[0] and new[1] == old[1], (old, new)
        assert f"TURN worker 0 (pid {old[0]}) was killed by SIGKILL" in server.text()
        for n in range(60, 80):
            await round_trip(survivor, survivor_relayed, peer, transport, n)

        # Flows stay on their worker: the survivor's 5-tuple still finds its allocation, the
        # victim's reaches the restarted worker, which has none (437), and allocates there.
        refreshed = await survivor.request(Method.REFRESH, {"LIFETIME": 600})
        assert refreshed.error_code is None, refreshed
        lost = await victim.request(Method.REFRESH, {"LIFETIME": 600})
        assert lost.error_code == 437, lost
        again = await victim.allocate()
        assert again.error_code is None, again
        assert worker_of(again.attributes["XOR-RELAYED-ADDRESS"][1]) == 0
    finally:
        transport.close()
        for client, _ in clients.values():
            client.close()


async def test_sigkill_of_the_main_process_leaves_no_worker(servers: list[ServerProcess]) -> None:
    server = await start(servers)
    pids = worker_pids(server)
    assert len(pids) == 2 and all(not gone(pid) for pid in pids.values())
    server.process.kill()
    await server.process.wait()
    await wait_until(lambda: all(gone(pid) for pid in pids.values()), what="the workers to end")


async def test_sigterm_stops_every_worker(servers: list[ServerProcess]) -> None:
    server = await start(servers)
    pids = worker_pids(server)
    assert await server.stop() == 0
    assert all(gone(pid) for pid in pids.values())
    assert "STUN/TURN stopped; 2 TURN workers" in server.text()
    assert "restarting" not in server.text()  # stopping is not dying


async def test_user_quota_holds_across_workers(servers: list[ServerProcess]) -> None:
    server = await start(servers, "--user-quota", "2")
    by_worker = await sockets_by_worker(server.port, {0: 2, 1: 2})
    first, second = by_worker[0][0], by_worker[1][0]
    for client in (first, second):
        client.username, client.key = "alice", None  # log in again as alice
        await client.login("alice", "wonderland")
        granted = await client.allocate()
        assert granted.error_code is None, granted
    # Alice has one allocation on each worker: a third is refused on either.
    for worker in (0, 1):
        third = by_worker[worker][1]
        await third.login("alice", "wonderland")
        refused = await third.allocate()
        assert refused.error_code == 486, (worker, refused)
    # One goes: there is room again (on the other worker too).
    assert (await first.request(Method.REFRESH, {"LIFETIME": 0})).error_code is None
    again = await by_worker[1][1].allocate()
    assert again.error_code is None, again
    for clients in by_worker.values():
        for client in clients:
            client.close()


async def test_max_allocations_is_split_between_workers(servers: list[ServerProcess]) -> None:
    assert shares(3, 2) == [2, 1]
    server = await start(servers, "--max-allocations", "3", "--user-quota", "0")
    by_worker = await sockets_by_worker(server.port, {0: 3, 1: 2})
    granted = {0: 0, 1: 0}
    for worker, clients in by_worker.items():
        for client in clients:
            response = await client.allocate()
            if response.error_code is None:
                granted[worker] += 1
            else:
                assert response.error_code == 508, response
    assert granted == {0: 2, 1: 1}  # 3 in all, never more
    for clients in by_worker.values():
        for client in clients:
            client.close()


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=TIMEOUT) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


async def test_healthz_sums_over_workers_and_shows_each(
    servers: list[ServerProcess], tmp_path: Path
) -> None:
    ready = tmp_path / "ready.json"
    server = await ServerProcess.start(
        *[a for a in BASE_ARGS if a != "--no-http"],
        *("--http-host", LOCALHOST, "--http-port", "0", "--db", str(tmp_path / "db")),
        *("--ready-file", str(ready)),
    )
    servers.append(server)
    await wait_until(ready.exists, what="the ready file")
    url = f"http://{LOCALHOST}:{json.loads(ready.read_text())['http']}/healthz"
    clients = await on_each_worker(server.port)
    try:
        status, body = await asyncio.to_thread(get_json, url)
        turn = body["turn"]
        assert status == 200 and turn["running"] is True, body
        assert turn["stats"]["allocations"] == 2, turn
        assert turn["stats"]["allocations_created"] >= 2, turn
        workers = turn["workers"]
        assert [(w["worker"], w["alive"], w["allocations"]) for w in workers] == [
            (0, True, 1),
            (1, True, 1),
        ], workers
        assert [w["relayPorts"] for w in workers] == [f"{lo}-{hi}" for lo, hi in SLICES]
        pids = worker_pids(server)
        assert [w["pid"] for w in workers] == [pids[0], pids[1]]

        os.kill(pids[1], signal.SIGSTOP)  # alive but not answering: reported as not alive
        try:
            status, body = await asyncio.to_thread(get_json, url)
        finally:
            os.kill(pids[1], signal.SIGCONT)
        assert status == 200 and body["turn"]["running"] is True, body
        assert [w["alive"] for w in body["turn"]["workers"]] == [True, False], body

        created = turn["stats"]["allocations_created"]
        os.kill(pids[1], signal.SIGKILL)
        await wait_until(lambda: "TURN worker 1 restarted" in server.text(), what="the restart")
        status, body = await asyncio.to_thread(get_json, url)
        turn = body["turn"]
        assert [(w["alive"], w["restarts"]) for w in turn["workers"]] == [(True, 0), (True, 1)]
        assert turn["stats"]["allocations"] == 1, turn  # worker 1's allocation is lost
        assert turn["stats"]["allocations_created"] >= created, turn  # counters never go down
    finally:
        for client, _ in clients.values():
            client.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_relay_to_relay_through_an_external_ip_that_does_not_hairpin(
    tmp_path: Path, workers: int
) -> None:
    """--external-ip 198.51.100.7, which nothing answers: in a network namespace with only
    loopback (no route there, so nothing can leave), two allocations (on two workers) relay to
    each other's advertised addresses; the server sends to its relays' real addresses."""
    need_netns()
    result = run_in_netns(HERE / "hairpin_relay.py", str(workers), str(tmp_path), timeout=120)
    logs = "".join(p.read_text() for p in tmp_path.glob("server-*.log"))
    assert result.returncode == 0, result.stdout + result.stderr + logs
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["no_route"] is True, report  # 198.51.100.7 was unreachable from the server
    relayed_a, relayed_b = report["relayed"]
    assert relayed_a[0] == relayed_b[0] == "198.51.100.7"
    if workers == 2:
        assert {worker_of(relayed_a[1]), worker_of(relayed_b[1])} == {0, 1}, report
    # Each heard the other, from the other's advertised relayed address.
    assert report["heard"] == {"a": ["from b", relayed_b], "b": ["from a", relayed_a]}, report
    stats = report["stats"]
    assert stats["peer_sentp"] >= 2 and stats["peer_rcvp"] >= 2, stats
    assert stats["peer_send_drops"] == 0, stats  # nothing was sent towards 198.51.100.7


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_aioice_clients_relay_on_both_workers(
    servers: list[ServerProcess], transport: str
) -> None:
    """aioice's TURN client, as aiortc uses it, on each of two workers: both ways, every size."""
    from aioice.turn import create_turn_endpoint

    server = await start(servers)
    loop = asyncio.get_running_loop()
    peer_transport, peer = await loop.create_datagram_endpoint(Peer, local_addr=(LOCALHOST, 0))
    peer_addr = peer_transport.get_extra_info("sockname")[:2]
    turns: dict[int, tuple[Any, Peer, tuple[str, int]]] = {}
    opened = []
    try:
        for _ in range(60):
            turn, got = await asyncio.wait_for(
                create_turn_endpoint(
                    Peer,
                    server_addr=(LOCALHOST, server.port),
                    username="alice",
                    password="wonderland",
                    transport=transport,
                ),
                TIMEOUT,
            )
            opened.append(turn)
            relayed = turn.get_extra_info("sockname")
            turns.setdefault(worker_of(relayed[1]), (turn, got, relayed))
            if len(turns) == 2:
                break
        assert len(turns) == 2
        for turn, got, relayed in turns.values():
            for size in (1, 3, 100, 1199, 1200):
                out = bytes(range(256)) * 5
                turn.sendto(out[:size], peer_addr)
                assert await asyncio.wait_for(peer.queue.get(), TIMEOUT) == (out[:size], relayed)
                peer_transport.sendto(out[-size:], relayed)
                assert await asyncio.wait_for(got.queue.get(), TIMEOUT) == (out[-size:], peer_addr)
    finally:
        for turn in opened:
            turn.close()
        peer_transport.close()


async def test_a_reservation_token_is_taken_on_another_worker(
    servers: list[ServerProcess],
) -> None:
    """EVEN-PORT with the R bit on one worker; the RESERVATION-TOKEN comes back on a 5-tuple the
    kernel steers to the other worker, which binds the reserved port (RFC 8656 §7.2)."""
    server = await start(servers)
    by_worker = await sockets_by_worker(server.port, {0: 1, 1: 2})
    first = await by_worker[0][0].allocate(even_port=True)
    assert first.error_code is None, first
    even = first.attributes["XOR-RELAYED-ADDRESS"][1]
    assert even % 2 == 0 and worker_of(even) == 0
    token = first.attributes["RESERVATION-TOKEN"]
    taken = await by_worker[1][0].allocate(reservation_token=token)
    assert taken.error_code is None, taken
    assert taken.attributes["XOR-RELAYED-ADDRESS"][1] == even + 1
    again = await by_worker[1][1].allocate(reservation_token=token)
    assert again.error_code == 508, again  # a token is good once
    forged = await by_worker[1][1].allocate(reservation_token=token[:4] + bytes(4))
    assert forged.error_code == 508, forged
    for clients in by_worker.values():
        for client in clients:
            client.close()
