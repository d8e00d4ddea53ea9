"""The fleet example in docs/deploy.md is valid compose YAML and means what the text says:
two instances on one Redis and one secret, each with ports and a TURN name of its own."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

DEPLOY = Path(__file__).parents[2] / "docs" / "deploy.md"


def test_fleet_example() -> None:
    text = DEPLOY.read_text()
    section = text[text.index("## A fleet") :]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None
    compose = yaml.safe_load(block.group(1))
    services = compose["services"]
    assert "redis" in services
    instances = [services["chat-a"], services["chat-b"]]
    envs = [service["environment"] for service in instances]
    assert {env["P2P_REDIS"] for env in envs} == {"redis://redis:6379/0"}
    assert all("P2P_SECRET" in env for env in envs)
    assert len({env["P2P_PUBLIC_HOST"] for env in envs}) == 2
    published = [
        (port.split(":", 1)[0], port.rsplit("/", 1)[1])  # (host port, protocol)
        for service in instances
        for port in service["ports"]
    ]
    assert len(published) == len(set(published))  # no host port taken twice
