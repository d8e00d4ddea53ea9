"""The `p2pserver` command: flags, P2P_* environment variables, and running the servers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from p2pserver.config import Settings

log = logging.getLogger("p2pserver")


def _port_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    try:
        lo, hi = int(low), int(high if sep else low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port range: {text!r} (use LOW-HIGH)") from None
    if not 1 <= lo <= hi <= 65535:
        raise argparse.ArgumentTypeError(f"port range out of bounds: {text!r}")
    return lo, hi


def _user(text: str) -> tuple[str, str]:
    name, sep, password = text.partition(":")
    if not sep or not name or not password:
        raise argparse.ArgumentTypeError(f"expected NAME:PASSWORD, got {text!r}")
    return name, password


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a CIDR: {text!r}") from None


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None


def _duration(text: str) -> float:
    """Seconds, or a number with an s/m/h/d suffix."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r}") from None


def _on_off(text: str) -> bool:
    value = text.strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="p2pserver",
        description="Rooms, WebSocket signaling and a STUN/TURN server for peer-to-peer web chat. "
        "Every option can also be set by an environment variable P2P_<OPTION> "
        "(e.g. P2P_TURN_PORT=3478; repeatable options take a comma-separated list).",
    )
    d = Settings()
    http = p.add_argument_group("HTTP: rooms and signaling")
    http.add_argument("--no-http", dest="http", action="store_false", help="do not serve HTTP")
    http.add_argument("--http-host", default=d.http_host, help="HTTP listen address")
    http.add_argument("--http-port", type=int, default=d.http_port, help="HTTP port (3000)")
    http.add_argument("--db", default=d.db, help="SQLite database file (p2pserver.db)")
    http.add_argument(
        "--public-host",
        default=None,
        help="host name or IP put in iceServers URLs (default: the host the client used)",
    )
    http.add_argument(
        "--cors-origin",
        dest="cors_origins",
        action="append",
        help="allowed CORS origin, repeatable (default: any origin)",
    )
    http.add_argument("--room-ttl", type=_duration, default=d.room_ttl, help="idle room lifetime")
    http.add_argument("--ice-ttl", type=int, default=d.ice_ttl, help="TURN credential lifetime, s")
    http.add_argument(
        "--room-peers", type=int, default=d.room_peers, help="peers per room unless maxPeers (2)"
    )
    http.add_argument(
        "--max-room-peers", type=int, default=d.max_room_peers, help="largest maxPeers (8)"
    )
    http.add_argument(
        "--rooms-per-minute",
        type=int,
        default=d.rooms_per_minute,
        help="rooms one address may create per minute (30)",
    )
    http.add_argument(
        "--ws-max-message", type=int, default=d.ws_max_message, help="signaling frame bytes (65536)"
    )
    http.add_argument(
        "--ws-messages-per-second",
        type=float,
        default=d.ws_messages_per_second,
        help="signaling frames per second per peer (50)",
    )
    http.add_argument(
        "--ws-connections-per-ip",
        type=int,
        default=d.ws_connections_per_ip,
        help="open WebSockets per client address (32)",
    )
    http.add_argument(
        "--ws-join-timeout",
        type=_duration,
        default=d.ws_join_timeout,
        help="time to send the join message (10s)",
    )
    http.add_argument(
        "--ws-max-errors",
        type=int,
        default=d.ws_max_errors,
        help="errors in 10 s that close a misbehaving peer (50)",
    )
    http.add_argument(
        "--ws-compression",
        type=_on_off,
        default=d.ws_compression,
        metavar="{on,off}",
        help="permessage-deflate on signaling WebSockets (off: it costs memory per peer)",
    )
    http.add_argument(
        "--pin-attempts",
        type=int,
        default=d.pin_attempts,
        help="wrong PINs per room and per address within --pin-lockout (5)",
    )
    http.add_argument(
        "--pin-lockout", type=_duration, default=d.pin_lockout, help="PIN lock-out window (300s)"
    )

    turn = p.add_argument_group("STUN/TURN")
    turn.add_argument("--no-turn", dest="turn", action="store_false", help="do not serve STUN/TURN")
    turn.add_argument("--turn-host", default=d.turn_host, help="STUN/TURN listen address")
    turn.add_argument("--turn-port", type=int, default=d.turn_port, help="UDP and TCP port (3478)")
    turn.add_argument("--tls-port", type=int, default=d.tls_port, help="TURN over TLS port (5349)")
    turn.add_argument("--tls-cert", default=None, help="PEM certificate: enables TURN over TLS")
    turn.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    turn.add_argument("--relay-ip", type=_ip, default=None, help="address relay sockets bind to")
    turn.add_argument(
        "--external-ip",
        type=_ip,
        default=None,
        help="relayed address shown to clients (behind NAT or in Docker)",
    )
    turn.add_argument(
        "--relay-ports", type=_port_range, default=d.relay_ports, help="relay port range LOW-HIGH"
    )
    turn.add_argument("--realm", default=d.realm, help="authentication realm")
    turn.add_argument("--user", dest="users", action="append", type=_user, help="NAME:PASSWORD")
    turn.add_argument("--secret", default=None, help="TURN REST API shared secret")
    turn.add_argument("--allow-peer", dest="allow_peers", action="append", type=_network)
    turn.add_argument("--deny-peer", dest="deny_peers", action="append", type=_network)
    turn.add_argument("--user-quota", type=int, default=d.user_quota, help="allocations per user")
    turn.add_argument("--max-allocations", type=int, default=d.max_allocations)
    turn.add_argument("--max-permissions", type=int, default=d.max_permissions)

    p.add_argument(
        "--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"]
    )
    return p


def _env_defaults(parser: argparse.ArgumentParser, environ: dict[str, str]) -> list[str]:
    """Turn P2P_* variables into command-line arguments placed before the real ones."""
    args: list[str] = []
    for action in parser._actions:
        flag = next((s for s in action.option_strings if s.startswith("--")), None)
        if flag is None or flag == "--help":
            continue
        value = environ.get("P2P_" + flag[2:].upper().replace("-", "_"))
        if value is None:
            continue
        if isinstance(action, argparse._StoreFalseAction | argparse._StoreTrueAction):
            if value.strip().lower() in ("1", "true", "yes", "on"):
                args.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for item in value.split(","):
                if item.strip():
                    args += [flag, item.strip()]
        else:
            args += [flag, value]
    return args


def parse_settings(
    argv: Sequence[str] | None = None, environ: dict[str, str] | None = None
) -> Settings:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(_env_defaults(parser, dict(os.environ if environ is None else environ)))
    ns = parser.parse_args(argv, namespace=ns)
    values: dict[str, Any] = vars(ns)
    for name in ("users", "allow_peers", "deny_peers"):
        values[name] = tuple(values[name] or ())
    values["cors_origins"] = tuple(values["cors_origins"] or ("*",))
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        parser.error("--tls-cert and --tls-key go together")
    if not values["http"] and not values["turn"]:
        parser.error("--no-http and --no-turn together leave nothing to serve")
    settings = Settings(**values)
    if settings.http:
        from p2pserver.app import check_settings

        try:
            check_settings(settings)
        except ValueError as exc:
            parser.error(str(exc))
    return settings


async def serve_turn_only(settings: Settings) -> None:
    from p2pserver.turn.server import TurnServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before start: it logs that we are ready
        loop.add_signal_handler(sig, stop.set)
    server = TurnServer(settings)
    await server.start()
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await server.stop()


async def serve_all(settings: Settings) -> None:
    from p2pserver.app import create_app
    from p2pserver.serving import DrainingServer, uvicorn_config

    app = create_app(settings)
    server = DrainingServer(uvicorn_config(app, settings), drain=app.state.hub.close_all)
    await server.serve()
    if not server.started:
        raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    main_task = serve_all(settings) if settings.http else serve_turn_only(settings)
    with contextlib.suppress(KeyboardInterrupt):
        try:
            import uvloop
        except ImportError:
            asyncio.run(main_task)
        else:
            uvloop.run(main_task)  # DESIGN.md: uvloop where installed
    return 0
