"""The Dockerfile and docker-compose.yml, checked without Docker (there is no engine on CI).

They are read as text and held against the code: every P2P_* variable is a real option and
parses, ports agree with the defaults and with each other, the install step is CI's, and the
HEALTHCHECK command is run for real against a p2pserver process.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from p2pserver.cli import build_parser, parse_settings
from p2pserver.config import Settings

ROOT = Path(__file__).parents[2]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        lines.append(current)
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def instructions(name: str) -> list[str]:
    return [args for kind, args in dockerfile() if kind == name]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instructions("ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def option_variables() -> set[str]:
    """P2P_* names the CLI reads: one per long flag."""
    names = set()
    for action in build_parser()._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                names.add("P2P_" + flag[2:].upper().replace("-", "_"))
    return names


def image_settings() -> Settings:
    env = {k: v for k, v in dockerfile_env().items() if k.startswith("P2P_")}
    return parse_settings([], environ=env)


def test_base_image_and_install_step_match_ci() -> None:
    (base,) = instructions("FROM")
    assert base == "python:3.11-slim"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11"  # the image's Python is the oldest the project supports

    makefile = (ROOT / "Makefile").read_text()
    make_extras = re.search(r"pip install --quiet -e '\.\[([\w,]+)\]'", makefile)
    assert make_extras, "the Makefile's install line changed: update the Dockerfile and this test"
    run = " ".join(instructions("RUN"))
    docker_extras = re.search(r"pip install --quiet '\.\[([\w,]+)\]'", run)
    assert docker_extras, run
    assert set(docker_extras[1].split(",")) == set(make_extras[1].split(",")) - {"test"}
    assert "pip install --quiet --upgrade pip" in makefile
    assert "pip install --quiet --upgrade pip" in run
    assert " -e " not in run  # a real install: the web client must come as package data


def test_environment_is_valid_options_and_matches_the_defaults() -> None:
    env = dockerfile_env()
    p2p = {k for k in env if k.startswith("P2P_")}
    assert p2p <= option_variables(), p2p - option_variables()
    settings, defaults = image_settings(), Settings()
    assert settings.db == "/data/p2pserver.db"
    assert settings.http_port == defaults.http_port == 3000
    assert settings.turn_port == defaults.turn_port == 3478
    assert settings.http_host == settings.turn_host == "0.0.0.0"
    # Not narrowed: with host networking the whole default range is there (docs/deploy.md).
    assert settings.relay_ports == defaults.relay_ports
    assert settings.health_file and settings.health_file.startswith("/tmp/")  # writable by p2p


def test_exposed_ports_are_the_ones_served() -> None:
    settings = image_settings()
    exposed = set(" ".join(instructions("EXPOSE")).split())
    # The relay range is the operator's to choose and publish: not in EXPOSE.
    assert exposed == {
        f"{settings.http_port}/tcp",
        f"{settings.turn_port}/udp",
        f"{settings.turn_port}/tcp",
    }


def test_runs_unprivileged_with_the_database_in_a_volume() -> None:
    (user,) = instructions("USER")
    assert user not in ("root", "0")
    assert re.search(rf"useradd --system .*\b{user}\b", " ".join(instructions("RUN")))
    volumes = instructions("VOLUME")
    assert volumes == ["/data"]
    assert image_settings().db.startswith("/data/")
    (entrypoint,) = instructions("ENTRYPOINT")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert json.loads(entrypoint) == ["p2pserver"] and "p2pserver" in scripts


def test_compose_publishes_what_the_image_exposes() -> None:
    (service,) = compose()["services"].values()
    exposed = set(" ".join(instructions("EXPOSE")).split())
    published = set()
    for mapping in service["ports"]:
        host, container = str(mapping).rsplit(":", 1)[-2:]
        assert host.split(":")[-1] == container.split("/")[0], mapping  # same port outside
        published.add(container)
    env = {k: str(v) for k, v in service["environment"].items()}
    assert {k for k in env if k.startswith("P2P_")} <= option_variables()
    # Published ports: the relay range must be narrowed to exactly the published one.
    assert published == exposed | {env["P2P_RELAY_PORTS"] + "/udp"}
    assert "P2P_EXTERNAL_IP" in env  # needed on a Docker bridge network (docs/deploy.md)
    assert any(str(volume).endswith(":/data") for volume in service["volumes"])


def test_dockerignore_keeps_the_build_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text().split()
    assert lines[lines.index("*") :][:4] == ["*", "!pyproject.toml", "!README.md", "!src/"]
    copied = {shlex.split(args)[0] for args in instructions("COPY")}
    assert copied == {"pyproject.toml", "src"}  # README.md and LICENSE go along in the first COPY


def _healthcheck_command() -> list[str]:
    (healthcheck,) = instructions("HEALTHCHECK")
    command = json.loads(healthcheck.split("CMD", 1)[1])
    assert command == ["python", "-m", "p2pserver.healthcheck"]
    return [sys.executable, *command[1:]]


@pytest.mark.slow
def test_healthcheck_follows_a_port_given_as_a_flag(tmp_path: Path) -> None:
    """The user's case: P2P_HTTP_PORT says one port, `--http-port` another; the flag wins."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2P_")}
    env.update({k: v for k, v in dockerfile_env().items() if k.startswith("P2P_")})
    env["P2P_HEALTH_FILE"] = str(tmp_path / "health")  # the image's /tmp path, here
    env["P2P_DB"] = str(tmp_path / "rooms.db")
    check = _healthcheck_command()

    def run_check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(check, env=env, capture_output=True, text=True, timeout=30)

    before = run_check()
    assert before.returncode == 1 and before.stdout.startswith("unhealthy: not listening")

    args = ["--no-turn", "--http-host", "127.0.0.1", "--http-port", str(port)]
    server = subprocess.Popen(
        [sys.executable, "-m", "p2pserver", *args, "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while (result := run_check()).returncode != 0:
            assert server.poll() is None, "p2pserver exited"
            assert time.monotonic() < deadline, f"healthcheck never passed: {result.stdout}"
            time.sleep(0.2)
        assert result.stdout == f"healthy: http://127.0.0.1:{port}/healthz answered 200\n"
    finally:
        server.terminate()
        server.wait(30)
    assert server.returncode == 0
    after = run_check()
    assert after.returncode == 1, after.stdout  # the file went with the server


def test_healthcheck_reports_an_unhealthy_server_with_the_reason(tmp_path: Path) -> None:
    """A 503 from /healthz, and a server that is gone, both fail the check with a reason."""
    import http.server
    import threading

    class Down(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b'{"status":"down"}')

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Down)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    health = tmp_path / "health"
    url = f"http://127.0.0.1:{httpd.server_port}/healthz"
    health.write_text(url + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2P_")}
    try:
        down = subprocess.run(
            [*_healthcheck_command(), str(health)], env=env, capture_output=True, text=True
        )
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert down.returncode == 1
    assert down.stdout == f'unhealthy: {url} answered 503: {{"status":"down"}}\n'
    gone = subprocess.run(
        [*_healthcheck_command(), str(health)], env=env, capture_output=True, text=True
    )
    assert gone.returncode == 1 and gone.stdout.startswith(f"unhealthy: {url}: "), gone.stdout


def test_health_url_points_where_the_server_answers() -> None:
    from p2pserver.serving import health_url

    assert health_url(("0.0.0.0", 3000)) == "http://127.0.0.1:3000/healthz"
    assert health_url(("::", 8080, 0, 0)) == "http://[::1]:8080/healthz"
    assert health_url(("10.1.2.3", 80)) == "http://10.1.2.3:80/healthz"
