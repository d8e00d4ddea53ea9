"""POST /create-chat, GET /check-chat/{roomId}, /healthz and CORS, over a real socket."""

from __future__ import annotations

import re
import socket
import sqlite3
from typing import Any

import pytest
from httpkit import Server, StartServer, wait_on_disk, wait_until

ROOM_ID = re.compile(r"[A-Za-z0-9_-]{22,}")


async def test_create_without_pin_and_check(server: Server) -> None:
    async with server.client() as http:
        created = await http.post("/create-chat", json={"withPin": False})
        assert created.status_code == 200
        body = created.json()
        assert set(body) == {"roomId", "pin"}
        assert ROOM_ID.fullmatch(body["roomId"])
        assert body["pin"] is None
        checked = await http.get(f"/check-chat/{body['roomId']}")
    assert checked.status_code == 200
    assert checked.json() == {"pin": False, "private": False}


async def test_create_with_pin_and_check(server: Server) -> None:
    async with server.client() as http:
        created = (await http.post("/create-chat", json={"withPin": True})).json()
        assert re.fullmatch(r"\d{6}", created["pin"])
        checked = await http.get(f"/check-chat/{created['roomId']}")
    assert checked.json() == {"pin": True, "private": False}


async def test_private_room_is_reported_by_check_chat(server: Server) -> None:
    async with server.client() as http:
        created = await http.post("/create-chat", json={"withPin": True, "private": True})
        assert created.status_code == 200
        body = created.json()
        assert set(body) == {"roomId", "pin"}  # the same answer as for any other room
        checked = await http.get(f"/check-chat/{body['roomId']}")
        public = (await http.post("/create-chat", json={"private": False})).json()
        checked_public = await http.get(f"/check-chat/{public['roomId']}")
    assert checked.json() == {"pin": True, "private": True}
    assert checked_public.json() == {"pin": False, "private": False}


@pytest.mark.parametrize("value", ["yes", 1, None, [], {}])
async def test_private_must_be_a_boolean(server: Server, value: Any) -> None:
    async with server.client() as http:
        response = await http.post("/create-chat", json={"private": value})
    assert response.status_code == 400
    assert response.json() == {"error": "bad-request", "message": '"private" must be true or false'}


async def test_missing_with_pin_and_empty_body_mean_no_pin(server: Server) -> None:
    async with server.client() as http:
        for response in (
            await http.post("/create-chat", json={}),
            await http.post("/create-chat"),
            await http.post("/create-chat", json={"maxPeers": 3}),
        ):
            assert response.status_code == 200, response.text
            assert response.json()["pin"] is None


async def test_room_ids_are_distinct(server: Server) -> None:
    ids = {(await server.create_room())[0] for _ in range(20)}
    assert len(ids) == 20


async def test_check_unknown_room_is_404(server: Server) -> None:
    async with server.client() as http:
        for room_id in ("A" * 22, "nope", "x" * 300, "%2e%2e"):
            response = await http.get(f"/check-chat/{room_id}")
            assert response.status_code == 404, room_id
            assert response.json()["error"] == "not-found"


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[true]",
        b'"withPin"',
        b'{"withPin": "yes"}',
        b'{"withPin": 1}',
        b'{"withPin": null}',
        b'{"maxPeers": 1}',
        b'{"maxPeers": 9}',
        b'{"maxPeers": "3"}',
        b'{"maxPeers": true}',
        b'{"maxPeers": 2.5}',
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
async def test_malformed_body_is_400(server: Server, body: bytes) -> None:
    async with server.client() as http:
        response = await http.post(
            "/create-chat", content=body[:4000], headers={"content-type": "application/json"}
        )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "bad-request"


async def test_oversized_body_is_413(server: Server) -> None:
    async with server.client() as http:
        response = await http.post("/create-chat", content=b" " * 100_000)
    assert response.status_code == 413
    assert response.json()["error"] == "too-large"


async def test_max_peers_bounds_follow_settings(start_server: StartServer) -> None:
    server = await start_server(max_room_peers=4)
    async with server.client() as http:
        assert (await http.post("/create-chat", json={"maxPeers": 4})).status_code == 200
        assert (await http.post("/create-chat", json={"maxPeers": 5})).status_code == 400


async def test_rooms_per_minute_gives_429_per_address(start_server: StartServer) -> None:
    server = await start_server(rooms_per_minute=3)
    async with server.client() as http:
        for _ in range(3):
            assert (await http.post("/create-chat", json={})).status_code == 200
        limited = await http.post("/create-chat", json={})
        assert limited.status_code == 429
        assert limited.json()["error"] == "rate-limited"
        assert int(limited.headers["retry-after"]) >= 1
        # Another client address (uvicorn trusts X-Forwarded-For from 127.0.0.1) is not limited.
        other = await http.post("/create-chat", json={}, headers={"x-forwarded-for": "192.0.2.7"})
        assert other.status_code == 200


async def test_cors_any_origin_by_default(server: Server) -> None:
    async with server.client() as http:
        simple = await http.post("/create-chat", json={}, headers={"origin": "https://a.example"})
        preflight = await http.options(
            "/create-chat",
            headers={
                "origin": "https://a.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type",
            },
        )
    assert simple.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in simple.headers
    assert preflight.status_code == 200
    assert "POST" in preflight.headers["access-control-allow-methods"]


async def test_cors_restricted_origins(start_server: StartServer) -> None:
    server = await start_server(cors_origins=("https://chat.example",))
    async with server.client() as http:
        good = await http.post("/create-chat", json={}, headers={"origin": "https://chat.example"})
        bad = await http.post("/create-chat", json={}, headers={"origin": "https://evil.example"})
    assert good.headers["access-control-allow-origin"] == "https://chat.example"
    assert "access-control-allow-origin" not in bad.headers


async def test_pin_is_stored_only_as_salted_hash(server: Server) -> None:
    room_a, pin_a = await server.create_room(withPin=True)
    room_b, _ = await server.create_room(withPin=True)
    await wait_on_disk(server.settings.db, room_a, room_b)
    with sqlite3.connect(server.settings.db) as db:
        rows = dict(db.execute("SELECT id, pin_hash FROM rooms").fetchall())
        dump = "\n".join(db.iterdump())
    assert pin_a is not None and pin_a not in dump
    assert rows[room_a].startswith("scrypt$")
    salt_a, salt_b = rows[room_a].split("$")[4], rows[room_b].split("$")[4]
    assert salt_a != salt_b


async def test_rooms_expire_after_ttl(start_server: StartServer) -> None:
    server = await start_server(room_ttl=1.0)
    room_id, _ = await server.create_room()

    async def gone() -> bool:
        async with server.client() as http:
            return (await http.get(f"/check-chat/{room_id}")).status_code == 404

    await wait_until(gone)

    async def swept() -> bool:  # the periodic sweep deletes the row, not just hides it
        with sqlite3.connect(server.settings.db) as db:
            return db.execute("SELECT count(*) FROM rooms").fetchone() == (0,)

    await wait_until(swept, 30)


async def test_healthz_without_turn(server: Server) -> None:
    async with server.client() as http:
        response = await http.get("/healthz")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    assert body["status"] == "ok"
    assert body["db"] == "ok"
    assert body["turn"] == {"enabled": False}
    assert body["signaling"] == {"connections": 0, "rooms": 0, "peers": 0}


async def test_db_fault_gives_500_and_unhealthy(server: Server) -> None:
    await server.app.state.hub.store.close()
    async with server.client() as http:
        create = await http.post("/create-chat", json={})
        health = await http.get("/healthz")
    assert create.status_code == 500
    assert create.json()["error"] == "internal"
    assert health.status_code == 503
    assert health.json()["db"] == "down"


async def test_unknown_route_and_method(server: Server) -> None:
    async with server.client() as http:
        assert (await http.get("/nope")).status_code == 404
        assert (await http.get("/create-chat")).status_code == 405


def test_bad_settings_are_refused() -> None:
    from p2pserver.app import create_app
    from p2pserver.config import Settings

    with pytest.raises(ValueError, match="room-peers"):
        create_app(Settings(room_peers=9, max_room_peers=8))
    with pytest.raises(ValueError, match="public-host"):
        create_app(Settings(public_host="not a host"))
    with pytest.raises(ValueError, match="ws-messages-per-second"):
        create_app(Settings(ws_messages_per_second=0))


def test_docs_list_every_error_and_close_code() -> None:
    from pathlib import Path

    from p2pserver import messages

    doc = (Path(__file__).parents[2] / "docs" / "api.md").read_text()
    for error in messages.FATAL_ERRORS + messages.NON_FATAL_ERRORS:
        assert f"`{error.code}`" in doc, error.code
        if error.close is not None:
            assert f"| {error.close} | `{error.code}`" in doc, error.code
    for flag in ("--rooms-per-minute", "--room-peers", "--ws-max-message", "--pin-lockout"):
        assert flag in doc


async def test_lifespan_runs_turn_and_healthz_reports_it(start_server: StartServer) -> None:
    server = await start_server(turn=True, turn_host="127.0.0.1", turn_port=0)  # a free port
    async with server.client() as http:
        response = await http.get("/healthz")
    assert response.status_code == 200
    turn = response.json()["turn"]
    assert turn["enabled"] is True
    assert turn["running"] is True
    assert turn["stats"]["allocations"] == 0
    assert server.app.state.turn is not None
    turn_port = server.app.state.turn.port
    # The TURN server holds its UDP port while the app runs.
    with pytest.raises(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", turn_port))


def test_nan_settings_are_refused() -> None:
    from p2pserver.app import create_app
    from p2pserver.config import Settings

    for name in ("ws_messages_per_second", "room_ttl", "pin_lockout", "ws_join_timeout"):
        with pytest.raises(ValueError, match=name.replace("_", "-")):
            create_app(Settings(**{name: float("nan")}))


async def test_sweep_forgets_old_create_limits(start_server: StartServer) -> None:
    import time

    server = await start_server(room_ttl=1.0)  # sweeps every second
    window = server.app.state.create_limiter.window  # SQLite: the limits stay in memory
    window.hit("192.0.2.99", time.monotonic() - 120)
    await wait_until(lambda: len(window) == 0)


async def test_middleware_added_after_create_app_also_wraps_create_chat() -> None:
    """POST /create-chat has a stack of its own (App.create_stack), built from the app's
    middleware when Starlette builds its own: one added later wraps it too."""
    import httpx
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from p2pserver.app import create_app
    from p2pserver.config import Settings

    class Stamp:
        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            async def stamped(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []), (b"x-stamp", b"1")]
                await send(message)

            await self.app(scope, receive, stamped)

    app = create_app(Settings())
    app.add_middleware(Stamp)
    # No lifespan, so no store: create-chat answers 500, through the middleware all the same.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        created = await http.post("/create-chat", json={})
        unknown = await http.get("/no-such-page")  # through Starlette's own stack: a 404
    assert unknown.status_code == 404 and unknown.headers.get("x-stamp") == "1", unknown
    assert created.headers.get("x-stamp") == "1", created
