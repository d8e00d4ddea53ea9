"""`p2pserver check` and the start-up self-test, against real servers on loopback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from netns import need_netns, run_in_netns
from p2pserver.check import IceUrl
from serverlog import TIMEOUT, Process, run_server
from tlskit import self_signed

HERE = Path(__file__).parent


def run_check(url: str, *extra: str) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "p2pserver", "check", url, "--timeout", "3", *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, result.stdout + result.stderr


async def start(tmp_path: Path, *extra: str) -> tuple[Process, str]:
    """A whole server on loopback, every port 0: the iceServers name the ports bound."""
    server = run_server(
        [
            "--http-host", "127.0.0.1", "--http-port", "0",
            "--turn-host", "127.0.0.1", "--turn-port", "0", "--tls-port", "0",
            "--db", str(tmp_path / "rooms.db"), *extra,
        ],
        tmp_path / "server.log",
    )  # fmt: skip
    match = await server.wait_for(r"Uvicorn running on (http://127\.0\.0\.1:\d+)")
    return server, match[1]


def self_test_report(base: str) -> dict:
    """The self-test as /healthz reports it, once it has finished."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as response:
            report = json.load(response)["turn"]["selfTest"]
        if report["status"] != "running" or time.monotonic() > deadline:
            return dict(report)
        time.sleep(0.1)


async def test_check_passes_against_a_healthy_server_on_every_transport(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server, base = await start(
        tmp_path, "--allow-peer", "127.0.0.0/8", "--tls-cert", cert, "--tls-key", key
    )
    try:
        status, output = run_check(base)
        report = self_test_report(base)
        refused = run_check(base, "--room", "NoSuchRoomNoSuchRoom00")
    finally:
        assert server.stop() == 0
    assert refused[0] == 2 and "refused the join: no such room" in refused[1], refused
    assert status == 0, output
    lines = output.splitlines()
    assert lines[0].startswith("stun ") and " ok " in lines[0], output
    for transport in ("udp", "tcp", "tls"):
        line = next(line for line in lines if line.startswith(f"{transport} "))
        assert " ok " in line and "relay-relay" in line and "relay-peer" in line, output
    assert lines[-1].startswith("verdict: ok"), output
    # The server tested itself at start-up: each listener, relay to relay, over loopback.
    assert report["status"] == "ok", report
    assert {(c["via"], c["transport"]) for c in report["checks"]} == {
        ("loopback", "udp"),
        ("loopback", "tcp"),
        ("loopback", "tls"),
    }
    assert "relay self-test ok" in server.log()


async def test_check_blames_a_wrong_external_ip(tmp_path: Path) -> None:
    # Relays bind 127.0.0.1 but are announced as 127.0.0.2, where nothing answers: as a
    # server behind NAT whose --external-ip is not its public address.
    server, base = await start(
        tmp_path,
        "--allow-peer", "127.0.0.0/8", "--relay-ip", "127.0.0.1", "--external-ip", "127.0.0.2",
    )  # fmt: skip
    try:
        status, output = run_check(base)
        report = self_test_report(base)
    finally:
        assert server.stop() == 0
    assert status == 1, output
    udp = next(line for line in output.splitlines() if line.startswith("udp "))
    assert "FAIL" in udp and "127.0.0.2:" in udp and "unreachable from here" in udp, output
    assert "--external-ip" in udp, output
    assert "verdict: FAIL" in output
    # The self-test fails at the advertised address; relay to relay over loopback works even
    # so, as it no longer goes out through --external-ip (docs/turn.md, "Relay to relay").
    assert report["status"] == "failed" and "advertised udp 127.0.0.2" in report["reason"], report
    assert all(c["ok"] for c in report["checks"] if c["via"] == "loopback"), report
    assert "relay self-test FAILED" in server.log()


def test_check_says_when_udp_to_the_turn_port_is_blocked(tmp_path: Path) -> None:
    """In a network namespace of its own, a firewall drops UDP to 3478; TCP still works."""
    need_netns(firewall=True)
    result = run_in_netns(HERE / "blocked_check.py", str(tmp_path), drop_udp_to=3478, timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    lines = output.splitlines()
    stun = next(line for line in lines if line.startswith("stun "))
    udp = next(line for line in lines if line.startswith("udp "))
    tcp = next(line for line in lines if line.startswith("tcp "))
    assert "FAIL" in stun and "UDP 3478 is open" in stun, output
    assert "FAIL" in udp and "no answer" in udp and "UDP 3478" in udp, output
    assert " ok " in tcp and "relay-peer" in tcp, output  # TCP gets through the same firewall
    assert "verdict: FAIL: stun, udp" in output, output


def test_ice_urls_as_browsers_read_them() -> None:
    assert IceUrl.parse("turn:[::1]:3478?transport=tcp") == IceUrl("turn", "::1", 3478, "tcp")
    assert IceUrl.parse("turn:example.org") == IceUrl("turn", "example.org", 3478, "udp")
    assert IceUrl.parse("turns:example.org") == IceUrl("turns", "example.org", 5349, "tls")
    assert IceUrl.parse("stun:192.0.2.1:3479").port == 3479
    for bad in ("http://x", "turn:h?transport=sctp"):
        with pytest.raises(ValueError):
            IceUrl.parse(bad)


def test_check_says_when_it_cannot_get_as_far_as_turn(tmp_path: Path) -> None:
    with socket.socket() as closed:  # a port nothing listens on: bound, never listening
        closed.bind(("127.0.0.1", 0))
        status, output = run_check(f"http://127.0.0.1:{closed.getsockname()[1]}")
    assert status == 2 and "cannot check: cannot reach http://127.0.0.1:" in output, output
    usage = subprocess.run(
        [sys.executable, "-m", "p2pserver", "check", "ftp://example.org"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert usage.returncode == 2 and "URL must start with http:// or https://" in usage.stderr


async def test_check_names_a_turn_port_nothing_answers_on(tmp_path: Path) -> None:
    """--no-turn still advertises TURN (it runs elsewhere in a split deployment): here nothing
    listens there, and the check says so per transport."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
        udp.bind(("127.0.0.1", 0))  # takes the datagrams, never answers
        port = udp.getsockname()[1]
        tcp.bind(("127.0.0.1", port))  # bound, not listening: connections are refused
        server = run_server(
            [
                "--http-host", "127.0.0.1", "--http-port", "0", "--no-turn",
                "--turn-port", str(port), "--db", str(tmp_path / "rooms.db"),
            ],
            tmp_path / "server.log",
        )  # fmt: skip
        try:
            base = (await server.wait_for(r"Uvicorn running on (http://127\.0\.0\.1:\d+)"))[1]
            status, output = run_check(base)
        finally:
            assert server.stop() == 0
    assert status == 1, output
    assert f"no answer from 127.0.0.1:{port}: check that UDP {port} is open" in output, output
    assert f"nothing listens on TCP {port}" in output, output
