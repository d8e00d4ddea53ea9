"""The `p2pserver` command: flags, P2P_* variables, start-up and clean shutdown."""

from __future__ import annotations

import gc
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pserver.cli import parse_settings
from p2pserver.serving import GC_YOUNG_THRESHOLD, tune_gc


def test_defaults() -> None:
    s = parse_settings([], environ={})
    assert (s.http, s.http_port, s.turn, s.turn_port, s.turn_host) == (
        True,
        3000,
        True,
        3478,
        "0.0.0.0",
    )
    assert s.relay_ports == (49152, 65535) and s.users == () and s.secret is None
    assert s.db == "p2pserver.db"


def test_flags() -> None:
    s = parse_settings(
        [
            "--no-http",
            "--turn-port", "3479",
            "--relay-ip", "192.0.2.5",
            "--external-ip", "203.0.113.9",
            "--relay-ports", "50000-50100",
            "--realm", "chat.example",
            "--user", "a:b", "--user", "c:d:e",
            "--secret", "xyz",
            "--allow-peer", "192.168.0.0/16",
            "--deny-peer", "8.8.8.0/24",
            "--log-level", "debug",
        ],
        environ={},
    )  # fmt: skip
    assert not s.http and s.turn_port == 3479
    assert s.relay_ips == ("192.0.2.5",) and s.external_ip == "203.0.113.9"
    assert s.relay_bind_ips == {1: "192.0.2.5"}
    assert s.relay_ports == (50000, 50100) and s.realm == "chat.example"
    assert s.users == (("a", "b"), ("c", "d:e"))  # a password may contain ':'
    assert s.secret == "xyz"
    assert s.allow_peers == (ipaddress.ip_network("192.168.0.0/16"),)
    assert s.deny_peers == (ipaddress.ip_network("8.8.8.0/24"),)
    assert s.log_level == "debug"


def test_environment_variables_and_flags_win_over_them() -> None:
    env = {
        "P2P_TURN_PORT": "4000",
        "P2P_USER": "a:b, c:d",
        "P2P_NO_HTTP": "true",
        "P2P_ALLOW_PEER": "10.0.0.0/8",
        "P2P_REALM": "env.realm",
    }
    s = parse_settings(["--realm", "flag.realm"], environ=env)
    assert s.turn_port == 4000 and not s.http
    assert s.users == (("a", "b"), ("c", "d"))
    assert s.allow_peers == (ipaddress.ip_network("10.0.0.0/8"),)
    assert s.realm == "flag.realm"


def test_relay_ip_once_per_family() -> None:
    s = parse_settings(["--relay-ip", "192.0.2.5", "--relay-ip", "2001:db8::5"], environ={})
    assert s.relay_bind_ips == {1: "192.0.2.5", 2: "2001:db8::5"}
    env = parse_settings([], environ={"P2P_RELAY_IP": "127.0.0.1,::1"})
    assert env.relay_bind_ips == {1: "127.0.0.1", 2: "::1"}
    assert parse_settings([], environ={}).relay_bind_ips == {1: "0.0.0.0"}  # --turn-host


@pytest.mark.parametrize(
    "argv",
    [
        ["--relay-ports", "9-1"],
        ["--relay-ports", "abc"],
        ["--user", "nopassword"],
        ["--allow-peer", "300.1.1.1/8"],
        ["--external-ip", "host.example"],
        ["--tls-cert", "cert.pem"],
        ["--no-http", "--no-turn"],
        ["--relay-ip", "192.0.2.5", "--relay-ip", "192.0.2.6"],  # one per family
        ["--ws-compression", "maybe"],
        ["--metrics-allow", "not-a-cidr"],
        ["--log-format", "xml"],
        ["--db-sync", "off"],
    ],
)
def test_bad_flags_exit_with_a_message(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_settings(argv, environ={})
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_turn_only_process_starts_logs_and_stops_cleanly_on_sigterm() -> None:
    args = [sys.executable, "-m", "p2pserver", "--no-http", "--turn-host", "127.0.0.1"]
    args += ["--turn-port", "0", "--user", "a:b"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "relays on" in line:
                break
        text = "".join(lines)
        assert re.search(r"listening on udp 127\.0\.0\.1:\d+", text), text
        assert re.search(r"listening on tcp 127\.0\.0\.1:\d+", text), text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_inconsistent_http_limits_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_settings(["--room-peers", "9", "--max-room-peers", "8"], environ={})
    assert info.value.code == 2
    assert "--room-peers" in capsys.readouterr().err


def run_failing_start(args: list[str], cwd: Path) -> str:
    """Run `p2pserver args` expecting it to refuse to start; return what it wrote."""
    command = [sys.executable, "-m", "p2pserver", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2P_")}
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1, output  # one clear line
    return errors[0]


@pytest.mark.parametrize("http", [False, True], ids=["turn-only", "http-and-turn"])
def test_turn_port_in_use_is_one_line(tmp_path: Path, http: bool) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        args = ["--turn-host", "127.0.0.1", "--turn-port", str(port), "--user", "a:b"]
        if http:
            args += ["--http-host", "127.0.0.1", "--http-port", "0", "--db", "rooms.db"]
        else:
            args.append("--no-http")
        line = run_failing_start(args, tmp_path)
    assert f"STUN/TURN cannot listen on udp 127.0.0.1:{port}" in line, line
    assert "in use" in line, line


def test_missing_certificate_is_one_line(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere" / "cert.pem")
    args = ["--no-http", "--turn-host", "127.0.0.1", "--turn-port", "0", "--user", "a:b"]
    args += ["--tls-cert", missing, "--tls-key", missing, "--tls-port", "0"]
    line = run_failing_start(args, tmp_path)
    assert f"cannot load --tls-cert {missing}" in line and "No such file" in line, line


@pytest.mark.parametrize("kind", ["not-sqlite", "directory"])
def test_unreadable_database_is_one_line(tmp_path: Path, kind: str) -> None:
    db = tmp_path / "rooms.db"
    if kind == "not-sqlite":
        db.write_bytes(b"this is not an SQLite database, it is a text file\n" * 100)
    else:
        db.mkdir()
    args = ["--no-turn", "--http-host", "127.0.0.1", "--http-port", "0", "--db", str(db)]
    line = run_failing_start(args, tmp_path)
    assert f"cannot open the database {db}" in line, line


def test_unreachable_redis_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    url = f"redis://:hunter2@127.0.0.1:{port}/0"
    args = ["--no-turn", "--http-host", "127.0.0.1", "--http-port", "0", "--redis", url]
    line = run_failing_start(args, tmp_path)
    assert f"cannot reach Redis at redis://:***@127.0.0.1:{port}/0" in line, line
    assert "hunter2" not in line, line


def test_redis_flag_and_environment_variable() -> None:
    assert parse_settings([]).redis is None
    assert parse_settings(["--redis", "redis://r:6379/0"]).redis == "redis://r:6379/0"
    assert parse_settings([], {"P2P_REDIS": "redis://e:6379/2"}).redis == "redis://e:6379/2"


def test_default_turn_workers_fit_a_small_relay_range() -> None:
    # The default is one worker per CPU, but never more workers than relay ports: a tiny range
    # (docker-compose.yml has 41 ports) must not stop a many-core host from starting.
    assert parse_settings(["--relay-ports", "50000-50000"], {}).turn_workers == 1
    assert parse_settings(["--relay-ports", "50000-50003"], {}).turn_workers == min(
        4, len(os.sched_getaffinity(0))
    )


def test_db_sync_flag() -> None:
    assert parse_settings([], {}).db_sync == "normal"
    assert parse_settings(["--db-sync", "full"], {}).db_sync == "full"
    assert parse_settings([], {"P2P_DB_SYNC": "full"}).db_sync == "full"


def test_resume_window_flag() -> None:
    assert parse_settings([]).resume_window == 30.0
    assert parse_settings(["--resume-window", "1m"]).resume_window == 60.0
    assert parse_settings([], {"P2P_RESUME_WINDOW": "5"}).resume_window == 5.0


def test_self_test_and_metrics_access_flags() -> None:
    # The CLI runs the start-up self-test unless told not to; Settings() alone (tests, embedding)
    # does not. /metrics is for loopback unless --metrics-allow names more.
    assert parse_settings([], environ={}).self_test
    assert not parse_settings(["--no-self-test"], environ={}).self_test
    assert not parse_settings([], environ={"P2P_NO_SELF_TEST": "1"}).self_test
    loopback = parse_settings([], environ={}).metrics_allow
    assert [str(n) for n in loopback] == ["127.0.0.0/8", "::1/128"]
    wide = parse_settings([], environ={"P2P_METRICS_ALLOW": "10.0.0.0/8,192.0.2.0/24"})
    assert [str(n) for n in wide.metrics_allow] == ["10.0.0.0/8", "192.0.2.0/24"]


def test_tune_gc_raises_only_the_young_threshold() -> None:
    """serving.tune_gc (called by the HTTP server's start): the youngest generation at 5,000
    at the least, the others as they were, and a collector someone turned off stays off."""
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)  # CPython's default
        tune_gc()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 10, 10)
        gc.set_threshold(20_000, 3, 4)
        tune_gc()
        assert gc.get_threshold() == (20_000, 3, 4)
        gc.set_threshold(0, 10, 10)
        tune_gc()
        assert gc.get_threshold()[0] == 0
    finally:
        gc.set_threshold(*saved)
