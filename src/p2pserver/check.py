"""`p2pserver check [URL]`: does TURN work from here, the way a browser would use it?

It creates a room (or joins `--room`), takes the iceServers the signaling hands out, and tests
every advertised TURN transport with turnprobe.py. One line per transport, then a verdict; the
exit status is 0 only when everything advertised works (docs/operations.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import websockets

from p2pserver.turnprobe import probe, stun_check

DEFAULT_URL = "http://127.0.0.1:3000"


class CheckError(Exception):
    """The check could not get as far as TURN: the reason, for a person."""


@dataclass(frozen=True)
class IceUrl:
    scheme: str  # stun, turn or turns
    host: str
    port: int
    transport: str  # udp, tcp or tls

    @classmethod
    def parse(cls, url: str) -> IceUrl:
        """RFC 7064/7065 URIs: stun:host[:port], turn[s]:host[:port][?transport=udp|tcp]."""
        scheme, _, rest = url.partition(":")
        hostport, _, query = rest.partition("?")
        if hostport.startswith("["):
            host, _, tail = hostport[1:].partition("]")
            port_text = tail.removeprefix(":")
        else:
            host, _, port_text = hostport.partition(":")
        secure = scheme == "turns"
        port = int(port_text) if port_text else (5349 if secure else 3478)
        transport = urllib.parse.parse_qs(query).get("transport", ["udp"])[0]
        if secure:
            transport = "tls"
        if scheme not in ("stun", "turn", "turns") or transport not in ("udp", "tcp", "tls"):
            raise ValueError(f"not a STUN/TURN URL: {url!r}")
        return cls(scheme, host, port, transport)


async def _resolve(host: str, port: int) -> tuple[str, int]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise CheckError(f"cannot resolve {host}")
    address = infos[0][4]
    return str(address[0]), int(address[1])


def _post_json(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return dict(json.load(response))


async def ice_servers(base: str, room: str | None, pin: str | None, timeout: float) -> list[dict]:
    """Join a room as a browser would and return the iceServers of the welcome."""
    base = base.rstrip("/")
    if room is None:
        try:
            created = await asyncio.to_thread(
                _post_json, f"{base}/create-chat", {"withPin": False}, timeout
            )
        except urllib.error.HTTPError as exc:
            raise CheckError(f"POST {base}/create-chat answered {exc.code}") from None
        except (OSError, ValueError) as exc:
            raise CheckError(f"cannot reach {base}: {exc}") from None
        room = str(created["roomId"])
    ws_url = "ws" + base.removeprefix("http") + f"/ws/{room}"
    join: dict[str, Any] = {"type": "join"} if pin is None else {"type": "join", "pin": pin}
    try:
        async with asyncio.timeout(timeout), websockets.connect(ws_url) as ws:
            await ws.send(json.dumps(join))
            reply = json.loads(await ws.recv())
    except (OSError, TimeoutError, websockets.WebSocketException) as exc:
        raise CheckError(f"signaling at {ws_url.split('/ws/')[0]}/ws/… failed: {exc}") from None
    if reply.get("type") != "welcome":
        # The server's refusal (docs/api.md, errors): {"type": "error", "code", "message"}.
        refusal = reply.get("message") or reply.get("code") or reply
        raise CheckError(f"the room refused the join: {refusal}")
    return list(reply.get("iceServers") or [])


async def check(
    base: str,
    room: str | None = None,
    pin: str | None = None,
    timeout: float = 5.0,
    say: Callable[[str], None] = print,
) -> int:
    """Run the whole check, saying one line per transport; the process exit status."""
    try:
        servers = await ice_servers(base, room, pin, timeout)
        stun_server: tuple[str, int] | None = None
        turns: list[tuple[IceUrl, str, str]] = []
        for entry in servers:
            urls = entry.get("urls") or []
            for text in [urls] if isinstance(urls, str) else urls:
                url = IceUrl.parse(text)
                if url.scheme == "stun" and stun_server is None:
                    stun_server = await _resolve(url.host, url.port)
                elif url.scheme != "stun":
                    turns.append((url, entry.get("username", ""), entry.get("credential", "")))
    except (CheckError, ValueError) as exc:
        say(f"cannot check: {exc}")
        return 2
    if not turns:
        say("verdict: FAIL: the server advertises no TURN server (is it run with --no-turn?)")
        return 1
    failed: list[str] = []
    if stun_server is not None:
        mapped, line = await stun_check(stun_server, timeout)
        say(line)
        if mapped is None:
            failed.append("stun")
    for url, username, password in turns:
        try:
            address = await _resolve(url.host, url.port)
        except (OSError, CheckError) as exc:
            say(f"{url.transport} {url.host}:{url.port}: FAIL  cannot resolve: {exc}")
            failed.append(url.transport)
            continue
        result = await probe(
            address, url.transport, username, password, stun_server=stun_server, timeout=timeout
        )
        say(result.line())
        if not result.ok:
            failed.append(url.transport)
    if failed:
        say(f"verdict: FAIL: {', '.join(failed)} advertised but not working (reasons above)")
        return 1
    say(f"verdict: ok: STUN and all {len(turns)} advertised TURN transports relay both ways")
    return 0


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="p2pserver check",
        description="Test a p2pserver as a browser would: join a room, then relay through every "
        "advertised TURN transport to a second allocation and to a plain UDP peer (this host).",
    )
    parser.add_argument("url", nargs="?", default=DEFAULT_URL, help=f"({DEFAULT_URL})")
    parser.add_argument("--room", help="join this room instead of creating one")
    parser.add_argument("--pin", help="the room's PIN, with --room")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per step (5)")
    args = parser.parse_args(argv)
    if not args.url.startswith(("http://", "https://")):
        parser.error(f"URL must start with http:// or https://, got {args.url!r}")
    return asyncio.run(check(args.url, args.room, args.pin, args.timeout))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
