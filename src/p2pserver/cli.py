"""The `p2pserver` command: flags, P2P_* environment variables, and running the servers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from p2pserver.config import SYNC_MODES, Settings, StartupError
from p2pserver.logs import configure_logging

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


def _cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and taskset set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


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
        "--db-sync",
        choices=SYNC_MODES,
        default=d.db_sync,
        help="normal: answer create-chat before the room is written (a crash or power cut "
        "just after may lose it); full: once it is written and the disk synced (normal)",
    )
    http.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help="keep rooms in Redis instead of --db, shared by every instance given the same URL "
        "(redis://[:PASSWORD@]HOST:PORT/DB)",
    )
    http.add_argument(
        "--resume-window",
        type=_duration,
        default=d.resume_window,
        help="how long a peer whose connection dropped keeps its place and id (30s)",
    )
    http.add_argument(
        "--redis-presence-ttl",
        type=_duration,
        default=d.redis_presence_ttl,
        help="with --redis: an instance that stops renewing its presence for this long is "
        "gone, and its peers are reported left within 1.5 times it (10s)",
    )
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
    http.add_argument(
        "--metrics-allow",
        dest="metrics_allow",
        action="append",
        type=_network,
        help="CIDR allowed to read /metrics, repeatable (default: 127.0.0.0/8 and ::1)",
    )
    http.add_argument(
        "--health-file",
        default=None,
        help="write the /healthz URL here once listening (the container's HEALTHCHECK reads it)",
    )

    turn = p.add_argument_group("STUN/TURN")
    turn.add_argument("--no-turn", dest="turn", action="store_false", help="do not serve STUN/TURN")
    turn.add_argument("--turn-host", default=d.turn_host, help="STUN/TURN listen address")
    turn.add_argument("--turn-port", type=int, default=d.turn_port, help="UDP and TCP port (3478)")
    turn.add_argument("--tls-port", type=int, default=d.tls_port, help="TURN over TLS port (5349)")
    turn.add_argument("--tls-cert", default=None, help="PEM certificate: enables TURN over TLS")
    turn.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    turn.add_argument(
        "--relay-ip",
        dest="relay_ips",
        action="append",
        type=_ip,
        help="address relay sockets bind to; repeat once per family (an IPv4 and an IPv6 "
        "address) for dual-stack relays (default: --turn-host)",
    )
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
    turn.add_argument(
        "--turn-workers",
        type=int,
        default=None,
        help="STUN/TURN worker processes; 1 serves in the main process "
        "(default: the CPUs this process may use, at most one per relay port)",
    )
    turn.add_argument(
        "--no-self-test",
        dest="self_test",
        action="store_false",
        help="skip the relay self-test at start-up (docs/operations.md)",
    )

    p.add_argument(
        "--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"]
    )
    p.add_argument(
        "--log-format",
        default=d.log_format,
        choices=["text", "json"],
        help="text for a terminal, json for one object per line (text)",
    )
    p.add_argument(
        "--ready-file",
        default=None,
        help="once every listener is up, write the ports they got here as JSON, e.g. "
        '{"http": 3000, "udp": 3478, "tcp": 3478} (port 0 asks the OS for a free one)',
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
    for name in ("users", "allow_peers", "deny_peers", "relay_ips"):
        values[name] = tuple(values[name] or ())
    families = [":" in ip for ip in values["relay_ips"]]
    if len(families) != len(set(families)):
        parser.error("--relay-ip: at most one IPv4 and one IPv6 address")
    values["cors_origins"] = tuple(values["cors_origins"] or ("*",))
    values["metrics_allow"] = tuple(values["metrics_allow"] or Settings().metrics_allow)
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        parser.error("--tls-cert and --tls-key go together")
    if not values["http"] and not values["turn"]:
        parser.error("--no-http and --no-turn together leave nothing to serve")
    low, high = values["relay_ports"]
    if values["turn_workers"] is None:  # each worker needs a relay port of its own at least
        values["turn_workers"] = min(_cpus(), high - low + 1)
    if not 1 <= values["turn_workers"] <= high - low + 1:
        # Each worker owns a slice of the relay range (docs/turn.md, "Workers").
        parser.error(
            f"--turn-workers must be from 1 to the size of --relay-ports ({high - low + 1})"
        )
    settings = Settings(**values)
    if settings.http:
        from p2pserver.app import check_settings

        try:
            check_settings(settings)
        except ValueError as exc:
            parser.error(str(exc))
    return settings


async def serve_turn_only(settings: Settings) -> None:
    from p2pserver.turn.workers import turn_server

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before start: it logs that we are ready
        loop.add_signal_handler(sig, stop.set)
    server = turn_server(settings)
    loop.add_signal_handler(signal.SIGHUP, server.reload_tls)
    await server.start()
    _write_ready(settings, {name: port for name, _, port in server.addresses})
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await server.stop()


async def _stored_secret(settings: Settings) -> str:
    """Open the database once before serving, so that one that does not open ends start-up
    with one line; return the TURN REST API secret (--secret, else the stored one)."""
    if settings.redis:
        return await _redis_secret(settings, settings.redis)
    from p2pserver.rooms import RoomStore

    try:
        # First with the sqlite3 module itself: aiosqlite leaves a worker thread behind when
        # its connect fails, which then complains (with a traceback) about the closed loop.
        with contextlib.closing(sqlite3.connect(settings.db)) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        store = await RoomStore.open(settings.db, settings.room_ttl, settings.db_sync)
    except (sqlite3.Error, OSError, RuntimeError) as exc:
        raise StartupError(f"cannot open the database {settings.db}: {exc}") from exc
    try:
        return settings.secret or await store.turn_secret()
    finally:
        await store.close()


async def _redis_secret(settings: Settings, url: str) -> str:
    """As _stored_secret, for --redis: Redis that does not answer ends start-up in one line."""
    from redis.exceptions import RedisError

    from p2pserver.redisstore import RedisRoomStore, redacted

    try:
        store = await RedisRoomStore.open(url, settings.room_ttl)
    except (RedisError, OSError, ValueError) as exc:  # ValueError: a malformed URL
        raise StartupError(f"cannot reach Redis at {redacted(url)}: {exc}") from exc
    try:
        return settings.secret or await store.turn_secret()
    except (RedisError, OSError) as exc:
        raise StartupError(f"cannot use Redis at {redacted(url)}: {exc}") from exc
    finally:
        await store.close()


async def serve_all(settings: Settings) -> None:
    from p2pserver.app import create_app
    from p2pserver.serving import DrainingServer, tune_gc, uvicorn_config

    tune_gc()
    secret = await _stored_secret(settings)
    turn = None
    bound: dict[str, int] = {}
    if settings.turn:
        from p2pserver.turn.workers import turn_server

        # Started before uvicorn, not in the app's lifespan, so that a port in use or a bad
        # certificate is one line rather than a traceback relayed by uvicorn; the lifespan
        # takes it from app.state and stops it at shutdown.
        turn = turn_server(settings, secret=secret)
        await turn.start()
        # With port 0 the OS chose: iceServers must name the ports actually bound.
        bound = {name: port for name, _, port in turn.addresses}
        settings = replace(
            settings,
            turn_port=bound["udp"],
            tls_port=bound.get("tls", settings.tls_port),
        )
    app = create_app(settings)
    app.state.turn = turn
    if turn is not None:  # SIGHUP: a renewed certificate for TURN over TLS (docs/operations.md)
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, turn.reload_tls)

    server = DrainingServer(
        uvicorn_config(app, settings),
        drain=app.state.hub.close_all,
        health_file=settings.health_file,
        on_listening=lambda http_port: _write_ready(settings, {"http": http_port, **bound}),
    )
    try:
        await server.serve()
    finally:
        if app.state.turn is not None:  # the lifespan never ran (or never ended)
            await app.state.turn.stop()
            app.state.turn = None
    if not server.started:
        raise SystemExit(1)


def _write_ready(settings: Settings, ports: dict[str, int]) -> None:
    """--ready-file: the ports, written whole (renamed into place) so a reader never sees half."""
    if settings.ready_file is None:
        return
    from p2pserver.serving import replace_file

    replace_file(settings.ready_file, json.dumps(ports))


def database_problem(path: str) -> str | None:
    """Why SQLite could not create or write `path` as this user, and what to do; None if it can.

    A container whose /data is a bind mount of a root-owned directory is the usual case:
    SQLite only says "unable to open database file".
    """
    if path in ("", ":memory:"):
        return None
    file = os.path.abspath(path)
    directory = os.path.dirname(file)
    if not os.path.isdir(directory):
        return f"cannot create {file}: no directory {directory}"
    # WAL mode writes FILE-wal and FILE-shm beside the file: the directory must be writable too.
    if os.access(directory, os.W_OK | os.X_OK) and (
        not os.path.exists(file) or os.access(file, os.R_OK | os.W_OK)
    ):
        return None
    uid, owner = os.getuid(), os.stat(directory).st_uid
    problem = (
        f"cannot write {file} as uid {uid}: make {directory} and its files writable for uid "
        f"{uid} (`chown -R {uid} {directory}`; in a container, on the host directory mounted there)"
    )
    if owner != 0:
        problem += f", or run as their owner (docker/podman run --user {owner})"
    return problem


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check"]:  # `p2pserver check [URL]`: the relay self-test, as a client
        from p2pserver.check import main as check

        return check(argv[1:])
    settings = parse_settings(argv)
    if settings.http and not settings.redis and (problem := database_problem(settings.db)):
        print(f"p2pserver: error: {problem}", file=sys.stderr)
        return 1
    configure_logging(settings.log_level, settings.log_format)
    main_task = serve_all(settings) if settings.http else serve_turn_only(settings)
    with contextlib.suppress(KeyboardInterrupt):
        try:
            import uvloop
        except ImportError:
            run: Any = asyncio.run
        else:
            log.info("event loop: uvloop")  # where installed (docs/architecture.md)
            run = uvloop.run
        try:
            run(main_task)
        except StartupError as exc:
            log.error("%s", exc)  # one line, no traceback: the operator's to fix (not a bug)
            return 1
    return 0
