"""The Dockerfile built and run for real, with podman, the way docs/deploy.md tells an operator.

The base image is a local stand-in for `python:3.11-slim` (tools/make-base-image.sh: debootstrap,
kept between runs). The image is built with `--format docker` (the OCI format has no HEALTHCHECK)
and run twice on one volume: with ports published on 127.0.0.1, then with host networking and the
ports given as flags. Everything the tests create (image, containers, volume) is removed by name.

Needs root, podman, runc and debootstrap: skipped without them, a failure under CI (.ci/run
installs them). `pytest -m "not container"` leaves these tests out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aioice import stun
from aioice.stun import Class, Message, Method

from netkit import free_port, free_turn_port
from realtools import need

sys.path.insert(0, str(Path(__file__).parents[1] / "turn"))

from stunclient import StunClient

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).parents[2]
RUN = f"p2ptest-{uuid.uuid4().hex[:8]}"  # every name this module creates starts with it
IMAGE = f"localhost/{RUN}:latest"
VOLUME = f"{RUN}-data"
USER, PASSWORD = "alice", "wonderland"
UID = 10001  # the image's user (Dockerfile)
RELAY_COUNT = 10
GATEWAY = "{{range .Subnets}}{{.Gateway}} {{end}}"
# podman as root sets RLIMIT_NPROC to a large default, which a sandbox without CAP_SYS_RESOURCE
# refuses; a lower limit is always allowed (docs/deploy.md).
RUN_FLAGS = [
    "--runtime",
    "runc",
    "--ulimit",
    "nofile=20000:20000",
    "--ulimit",
    "nproc=4096:4096",
]


def _missing() -> str | None:
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool) is None:
            return (
                f"{tool} is not installed (apt-get install podman runc debootstrap; .ci/run does)"
            )
    if os.getuid() != 0:
        return "the container tests run podman and debootstrap as root"
    return None


def podman(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {result.returncode}\n{result.stderr}")
    return result


def _remove_container(name: str) -> None:
    podman("rm", "--force", "--volumes", "--time", "5", name, check=False)  # anonymous volumes too


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    need("podman", _missing())  # skip, or with CI set fail (tests/realtools.py)
    started = time.monotonic()
    base = subprocess.run(
        [str(ROOT / "tools" / "make-base-image.sh")], capture_output=True, text=True, timeout=900
    )
    assert base.returncode == 0, base.stderr
    print(f"\nbase image: {base.stdout.strip()} ({time.monotonic() - started:.0f} s)")
    started = time.monotonic()
    try:
        # --layers=false: one image and no intermediate ones to clean up; --pull=never: the
        # base is the local stand-in.
        build = podman(
            *("build", "--pull=never", "--format", "docker", "--layers=false", "--tag", IMAGE),
            str(ROOT),
            timeout=900,
            check=False,
        )
        assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
        print(f"image build: {time.monotonic() - started:.0f} s")
        yield IMAGE
    finally:
        podman("rmi", "--force", IMAGE, check=False)


@pytest.fixture(scope="module")
def volume(image: str) -> Iterator[str]:
    podman("volume", "create", VOLUME)
    try:
        yield VOLUME
    finally:
        podman("volume", "rm", "--force", VOLUME, check=False)


@dataclass
class Running:
    name: str
    http: int  # on 127.0.0.1
    turn: int  # UDP and TCP, on 127.0.0.1

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http}{path}"

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr


def _http(method: str, url: str, timeout: float = 5.0) -> tuple[int, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _start(name: str, args: list[str], http: int, turn: int) -> Running:
    """`podman run -d`, then wait for /healthz to answer 200 (or the container to stop)."""
    podman("run", "--detach", "--name", name, *RUN_FLAGS, *args, timeout=120)
    running = Running(name, http, turn)
    deadline = time.monotonic() + 90
    while True:
        with contextlib.suppress(OSError, ValueError):
            if _http("GET", running.url("/healthz"), timeout=2)[0] == 200:
                return running
        state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        assert state == "running", f"container {state}:\n{running.logs()}"
        assert time.monotonic() < deadline, f"/healthz never answered 200:\n{running.logs()}"
        time.sleep(0.3)


def _free_udp_range(count: int) -> tuple[int, int]:
    """`count` consecutive UDP ports free on 127.0.0.1 now (published ranges need fixed ports)."""
    for _ in range(200):
        low = random.randrange(40000, 48000)
        with contextlib.ExitStack() as stack:
            try:
                for port in range(low, low + count):
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return low, low + count - 1
    raise RuntimeError("no free UDP port range")


@dataclass
class Published(Running):
    relay_ports: tuple[int, int]
    room: str


@pytest.fixture(scope="module")
def published(image: str, volume: str) -> Iterator[Published]:
    """Ports published on 127.0.0.1 only; the relay range narrowed to the published one."""
    name = f"{RUN}-published"
    http, turn = free_port(), free_turn_port()
    low, high = _free_udp_range(RELAY_COUNT)
    # This host's traffic to a published port reaches the container from the bridge's gateway
    # (NAT): the test's peer socket looks like that address to the relay, and the peer policy
    # must let the relay answer it (loopback stays denied).
    gateway = podman("network", "inspect", "podman", "--format", GATEWAY).stdout.split()[0]
    args = [
        *("--publish", f"127.0.0.1:{http}:3000/tcp"),
        *("--publish", f"127.0.0.1:{turn}:3478/udp"),
        *("--publish", f"127.0.0.1:{turn}:3478/tcp"),
        *("--publish", f"127.0.0.1:{low}-{high}:{low}-{high}/udp"),
        *("--env", f"P2P_RELAY_PORTS={low}-{high}"),
        *("--env", "P2P_EXTERNAL_IP=127.0.0.1"),  # where a client on this host reaches relays
        *("--env", f"P2P_USER={USER}:{PASSWORD}"),
        *("--env", f"P2P_ALLOW_PEER={gateway}/32"),
        *("--volume", f"{volume}:/data"),
        image,
    ]
    try:
        running = _start(name, args, http, turn)
        status, body = _http("POST", running.url("/create-chat"))
        assert status == 200, body
        yield Published(name, http, turn, (low, high), body["roomId"])
    finally:
        _remove_container(name)


@pytest.fixture(scope="module")
def host_network(image: str, volume: str, published: Published) -> Iterator[Running]:
    """Host networking, ports as flags (not variables), on the volume the first one used."""
    podman("stop", "--time", "10", published.name, timeout=60)  # a restart on the same volume
    name = f"{RUN}-host"
    http, turn = free_port(), free_turn_port()
    args = [
        *("--network", "host"),
        *("--env", f"P2P_USER={USER}:{PASSWORD}"),
        *("--volume", f"{volume}:/data"),
        image,
        *("--http-host", "127.0.0.1", "--http-port", str(http)),
        *("--turn-host", "127.0.0.1", "--turn-port", str(turn)),
        *("--allow-peer", "127.0.0.1/32"),  # the test's peer socket: relayed data, end to end
    ]
    try:
        yield _start(name, args, http, turn)
    finally:
        _remove_container(name)


# -- the checks ----------------------------------------------------------------------------


def test_image_keeps_its_healthcheck_user_and_ports(image: str) -> None:
    (info,) = json.loads(podman("image", "inspect", image).stdout)
    # Only the Docker image format carries HEALTHCHECK (hence `podman build --format docker`).
    assert info["Healthcheck"]["Test"] == ["CMD", "python", "-m", "p2pserver.healthcheck"]
    config = info["Config"]
    assert config["User"] == "p2p"
    assert set(config["ExposedPorts"]) == {"3000/tcp", "3478/udp", "3478/tcp"}
    assert config["Entrypoint"] == ["p2pserver"]


def _healthcheck(running: Running) -> None:
    result = podman("healthcheck", "run", running.name, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    health = podman("inspect", "--format", "{{json .State.Health}}", running.name).stdout
    state = json.loads(health)
    assert state["Status"] == "healthy", state
    assert state["Log"][-1]["Output"].startswith("healthy: http://127.0.0.1:"), state


def _process_uid(running: Running) -> int:
    status = podman("exec", running.name, "cat", "/proc/1/status").stdout
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert len(set(uids)) == 1, uids  # real, effective, saved and fs uid alike
    return int(uids[0])


def test_published_ports_serve_http_and_the_healthcheck(published: Published) -> None:
    status, body = _http("GET", published.url("/healthz"))
    assert status == 200 and body["status"] == "ok", body
    assert _http("GET", published.url(f"/check-chat/{published.room}")) == (
        200,
        {"pin": False, "private": False},
    )
    _healthcheck(published)
    assert _process_uid(published) == UID


async def _allocate(server: tuple[str, int], transport: str) -> tuple[StunClient, tuple[str, int]]:
    client = await StunClient.connect(server, transport)
    await client.login(USER, PASSWORD)
    response = await client.allocate()
    assert response.message_class == Class.RESPONSE, response
    return client, response.attributes["XOR-RELAYED-ADDRESS"]


class _Peer(asyncio.DatagramProtocol):
    """A peer on 'the Internet': a plain UDP socket on 127.0.0.1."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr))


async def _relay_round_trip(turn: tuple[str, int], transports: tuple[str, ...]) -> list[int]:
    """Allocate over each transport; a peer sends to the relayed address first (so a relay port
    that is not reachable shows), then the client answers through the relay. Relay ports used."""
    loop = asyncio.get_running_loop()
    sock, peer = await loop.create_datagram_endpoint(_Peer, local_addr=("127.0.0.1", 0))
    try:
        # Where the container sees the peer: ask its STUN server, from the peer's socket.
        binding = Message(Method.BINDING, Class.REQUEST)
        sock.sendto(bytes(binding), turn)
        answer = stun.parse_message((await asyncio.wait_for(peer.queue.get(), 10))[0])
        seen_as = answer.attributes["XOR-MAPPED-ADDRESS"]
        ports = []
        for transport in transports:
            client, relayed = await _allocate(turn, transport)
            try:
                permission = await client.request(
                    Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": seen_as}
                )
                assert permission.message_class == Class.RESPONSE, permission
                sock.sendto(b"in " + transport.encode(), tuple(relayed))
                indication = stun.parse_message(await client.receive(10))
                assert indication.message_method == Method.DATA, indication
                assert indication.attributes["DATA"] == b"in " + transport.encode()
                assert indication.attributes["XOR-PEER-ADDRESS"] == seen_as
                payload = b"out " + transport.encode()
                send = Message(
                    Method.SEND,
                    Class.INDICATION,
                    None,
                    {"XOR-PEER-ADDRESS": seen_as, "DATA": payload},
                )
                client.send_raw(bytes(send))
                assert await asyncio.wait_for(peer.queue.get(), 10) == (payload, tuple(relayed))
                assert relayed[0] == "127.0.0.1", relayed  # --external-ip / --turn-host
                ports.append(relayed[1])
            finally:
                client.close()
        return ports
    finally:
        sock.close()


async def test_published_ports_answer_stun_and_relay_in_the_published_range(
    published: Published,
) -> None:
    server = ("127.0.0.1", published.turn)
    binding = await StunClient.connect(server, "udp")
    try:
        answer = await binding.request(Method.BINDING, sign=False)
        assert answer.message_class == Class.RESPONSE
        assert "XOR-MAPPED-ADDRESS" in answer.attributes
    finally:
        binding.close()
    low, high = published.relay_ports
    ports = await _relay_round_trip(server, ("udp", "tcp"))
    assert all(low <= port <= high for port in ports), (ports, published.relay_ports)


async def test_host_networking_follows_flags_and_keeps_the_full_relay_range(
    host_network: Running, published: Published
) -> None:
    # The room created before the restart is still there: the volume keeps the database.
    assert _http("GET", host_network.url(f"/check-chat/{published.room}")) == (
        200,
        {"pin": False, "private": False},
    )
    _healthcheck(host_network)  # --http-port was a flag; the image's variable says 3000
    assert _process_uid(host_network) == UID
    assert "ports 49152-65535" in host_network.logs()  # not narrowed by the image

    ports = await _relay_round_trip(("127.0.0.1", host_network.turn), ("udp", "tcp"))
    assert all(49152 <= port <= 65535 for port in ports), ports


def test_root_owned_data_mount_says_what_to_do(image: str) -> None:
    name = f"{RUN}-rootdata"
    data = Path(tempfile.mkdtemp(prefix=f"{RUN}-"))  # root-owned, 0755: uid 10001 cannot write
    data.chmod(0o755)
    try:
        result = podman(
            *("run", "--rm", "--name", name, *RUN_FLAGS, "--volume", f"{data}:/data", image),
            timeout=120,
            check=False,
        )
    finally:
        _remove_container(name)
        shutil.rmtree(data)
    assert result.returncode == 1, result.stderr
    expected = (
        f"p2pserver: error: cannot write /data/p2pserver.db as uid {UID}: "
        f"make /data and its files writable for uid {UID} (`chown -R {UID} /data`"
    )
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
