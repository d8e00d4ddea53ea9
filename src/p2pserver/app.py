"""The Starlette app: HTTP API, WebSocket signaling route, and the lifespan that runs it all."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from p2pserver.config import Settings
from p2pserver.ice import url_host
from p2pserver.metrics import HttpMetrics, Metrics
from p2pserver.roomcache import RoomCache
from p2pserver.signaling import Hub, client_address
from p2pserver.store import Limiter, StoreUnavailable, open_store

log = logging.getLogger("p2pserver.app")

MAX_BODY = 4096  # a create-chat body is a few dozen bytes
WEB_DIR = Path(__file__).parent / "web"  # the reference client (package data)

# The page loads nothing from elsewhere; blob: and mediastream: are received files and video.
WEB_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "media-src 'self' blob: mediastream:; connect-src 'self'; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # revalidate (ETag) so an upgrade reaches every browser
}


def check_settings(settings: Settings) -> None:
    """Refuse settings the HTTP side cannot honour, before anything starts."""
    problems = []
    if not 2 <= settings.room_peers <= settings.max_room_peers:
        problems.append("--room-peers must be between 2 and --max-room-peers")
    for name in (
        "rooms_per_minute",
        "ws_max_message",
        "ws_connections_per_ip",
        "pin_attempts",
        "ws_max_errors",
        "ice_ttl",
    ):
        if getattr(settings, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1")
    for name in (
        "room_ttl",
        "ws_messages_per_second",
        "ws_join_timeout",
        "pin_lockout",
        "redis_presence_ttl",
        "resume_window",
    ):
        if not getattr(settings, name) > 0:  # `<= 0` would let NaN through
            problems.append(f"--{name.replace('_', '-')} must be positive")
    if settings.public_host is not None and url_host(settings.public_host) is None:
        problems.append(f"--public-host {settings.public_host!r} is not a host name or IP")
    if problems:
        raise ValueError("; ".join(problems))


def _error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    return JSONResponse({"error": code, "message": message}, status, headers=headers)


class _BadRequest(Exception):
    pass


def _parse_create(body: bytes, settings: Settings) -> tuple[bool, int, bool]:
    """(withPin, maxPeers, private) from a create-chat body; an empty body means all defaults."""
    data: Any = {}
    if body.strip():
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise _BadRequest("body is not valid JSON") from None
    if not isinstance(data, dict):
        raise _BadRequest("body must be a JSON object")
    with_pin = data.get("withPin", False)
    if not isinstance(with_pin, bool):
        raise _BadRequest('"withPin" must be true or false')
    max_peers = data.get("maxPeers", settings.room_peers)
    high = settings.max_room_peers
    # bool is an int subclass: reject true/false explicitly.
    if isinstance(max_peers, bool) or not isinstance(max_peers, int) or not 2 <= max_peers <= high:
        raise _BadRequest(f'"maxPeers" must be an integer from 2 to {high}')
    private = data.get("private", False)
    if not isinstance(private, bool):
        raise _BadRequest('"private" must be true or false')
    return with_pin, max_peers, private


async def _read_body(request: Request) -> bytes | None:
    """The body, or None if it is larger than MAX_BODY (read no further than that)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


_CREATE_RESULTS = {200: "created", 429: "rate-limited", 400: "bad-request", 413: "bad-request"}


async def create_chat(request: Request) -> Response:
    response = await _create_chat(request)
    metrics: Metrics = request.app.state.metrics
    metrics.create_chat.labels(_CREATE_RESULTS.get(response.status_code, "error")).inc()
    return response


async def _create_chat(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    limiter: Limiter = request.app.state.create_limiter
    body = await _read_body(request)
    if body is None:
        return _error(413, "too-large", f"body larger than {MAX_BODY} bytes")
    try:
        with_pin, max_peers, private = _parse_create(body, settings)
    except _BadRequest as exc:
        return _error(400, "bad-request", str(exc))
    ticket, wait = await limiter.acquire(client_address(request))
    if ticket is None:
        return _error(
            429,
            "rate-limited",
            "too many rooms created, slow down",
            {"Retry-After": str(max(1, round(wait + 0.5)))},
        )
    store: RoomCache = request.app.state.hub.store
    room_id, pin = await store.create(
        with_pin=with_pin, max_peers=max_peers, now=time.time(), private=private
    )
    return JSONResponse({"roomId": room_id, "pin": pin})


async def check_chat(request: Request) -> Response:
    store: RoomCache = request.app.state.hub.store
    room = await store.get(request.path_params["room_id"], time.time())
    if room is None:
        return _error(404, "not-found", "no such room")
    return JSONResponse({"pin": room.has_pin, "private": room.private})


async def healthz(request: Request) -> Response:
    hub: Hub = request.app.state.hub
    db_ok = hub.store is not None and await hub.store.ping()
    body: dict[str, Any] = {"db": "ok" if db_ok else "down", "signaling": hub.stats()}
    if hub.fleet is not None:  # --redis: this instance in its fleet
        db_ok = db_ok and hub.fleet.up
        body["fleet"] = {"instance": hub.fleet.id, "redis": "up" if hub.fleet.up else "down"}
    turn = request.app.state.turn
    turn_ok = True
    if not request.app.state.settings.turn:
        body["turn"] = {"enabled": False}
    else:
        workers = None
        try:
            if turn is not None:
                await turn.refresh()  # worker processes report their counts, if there are any
                workers = turn.workers_report()
                stats = turn.stats() if turn.running else None
            else:
                stats = None
        except Exception:  # a broken TURN server is reported, not raised
            log.exception("TURN stats failed")
            stats = None
        turn_ok = stats is not None
        body["turn"] = {"enabled": True, "running": turn_ok, "stats": stats or {}}
        if workers is not None:  # each worker's liveness (docs/operations.md)
            body["turn"]["workers"] = workers
        if turn is not None:  # reported, not part of the status: see docs/operations.md
            body["turn"]["selfTest"] = turn.self_test.report()
    if db_ok and turn_ok:
        body["status"] = "ok"
    elif hub.fleet is not None and turn_ok:
        # Redis away: peers here go on talking, nothing new can start (docs/deploy.md).
        body["status"] = "degraded"
    else:
        body["status"] = "down"
    return JSONResponse(body, 200 if db_ok and turn_ok else 503)


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus metrics, for the addresses --metrics-allow lists (docs/operations.md)."""
    metrics: Metrics = request.app.state.metrics
    if not metrics.allowed(request.client.host if request.client else None):
        return _error(403, "forbidden", "metrics are not served to this address (--metrics-allow)")
    turn = request.app.state.turn
    if turn is not None:
        await turn.refresh()  # worker processes report their counts (a no-op with one process)
    return Response(metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


class WebFiles(StaticFiles):
    """The reference web client's files, with headers that lock the page to this origin."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(WEB_HEADERS)
        return response


# A Host header that is only a host name or IP literal and a port: safe to put into a header.
_HOST_HEADER = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def _page(request: Request, name: str) -> Response:
    headers = dict(WEB_HEADERS)
    host = request.headers.get("host", "")
    if _HOST_HEADER.fullmatch(host):
        # CSP Level 3 lets 'self' cover ws: and wss: to this origin; older engines need them
        # named, and the page's WebSocket goes to the host it was loaded from.
        headers["Content-Security-Policy"] = headers["Content-Security-Policy"].replace(
            "connect-src 'self'", f"connect-src 'self' ws://{host} wss://{host}"
        )
    return FileResponse(WEB_DIR / name, headers=headers)


async def index(request: Request) -> Response:
    return _page(request, "index.html")


async def check_page(request: Request) -> Response:
    """The connection check page (docs/web.md): it joins a room too, for the iceServers."""
    return _page(request, "check.html")


_SIGNALING_PATH = re.compile(r"/ws/([^/]+)")


class App(Starlette):
    """Starlette, except for the two requests every new peer makes.

    Signaling WebSockets go straight to the hub: middleware and routing have nothing to do for
    them (CORS is HTTP only; the hub answers its own faults), and each open socket would
    otherwise keep their frames alive for as long as it stays connected. `POST /create-chat`
    goes through a stack of its own (`create_stack`), built with Starlette's from the same
    middleware and exception handlers (added ones too), without Starlette's exception
    middleware and router in between. bench/README.md has the memory and peers-ready figures.
    """

    create_route: Route | None = None  # set by create_app
    create_stack: ASGIApp | None = None  # built with the middleware stack

    def build_middleware_stack(self) -> ASGIApp:
        if self.create_route is not None:
            self.create_stack = _create_stack(
                self.create_route, self.user_middleware, self.exception_handlers
            )
        return super().build_middleware_stack()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.middleware_stack is None:  # both stacks at the first call, as Starlette does
            self.middleware_stack = self.build_middleware_stack()
        if scope["type"] == "websocket":
            match = _SIGNALING_PATH.fullmatch(scope["path"])
            if match is not None:
                scope["app"] = self
                scope["path_params"] = {"room_id": match[1]}
                await self.state.hub.serve(WebSocket(scope, receive, send))
                return
        elif (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] == "/create-chat"
            and self.create_stack is not None
        ):
            scope["app"] = self
            await self.create_stack(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _create_stack(
    create_route: Route,
    middleware: list[Middleware],
    handlers: Mapping[type[Exception], Callable[[Request, Exception], Awaitable[Response]]],
) -> ASGIApp:
    """POST /create-chat through the app's own middleware list and exception handlers, without
    the router and Starlette's exception middleware (App)."""

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = create_route  # what the router would say: the metrics' route label
        request = Request(scope, receive)
        try:
            response = await create_chat(request)
        except Exception as exc:
            kind = next(k for k in type(exc).__mro__ if k in handlers)  # Exception at least
            if kind is Exception:
                log.exception("create-chat failed")
            response = await handlers[kind](request, exc)
        await response(scope, receive, send)

    stack: ASGIApp = endpoint
    for cls, args, kwargs in reversed(middleware):
        stack = cls(stack, *args, **kwargs)
    return stack


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not-found", 405: "method-not-allowed"}
    return _error(
        exc.status_code, codes.get(exc.status_code, "error"), str(exc.detail), exc.headers
    )


async def _unavailable(request: Request, exc: Exception) -> Response:
    # Redis away (--redis): try again shortly; the server reconnects by itself.
    message = "the room store cannot be reached; try again shortly"
    return _error(503, "unavailable", message, {"Retry-After": "5"})


async def _server_error(request: Request, exc: Exception) -> Response:
    return _error(500, "internal", "internal server error")


async def sweep_forever(
    hub: Hub, store: RoomCache, create_limiter: Limiter, interval: float
) -> None:
    """Keep rooms with connected peers fresh, delete idle ones, forget old rate-limit entries."""
    while True:
        await asyncio.sleep(interval)
        try:
            await store.touch(hub.active_rooms(), time.time())
            deleted = await store.sweep(time.time())
            hub.prune()
            create_limiter.prune()
            if deleted:
                log.info("expired %d idle room(s)", deleted)
        except StoreUnavailable:  # Redis away: the fleet says so once; sweep again next time
            pass
        except Exception:  # keep sweeping; a transient DB error must not end expiry for good
            log.exception("room sweep failed")


def create_app(settings: Settings) -> Starlette:
    check_settings(settings)
    hub = Hub(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store = RoomCache(await open_store(settings))
        try:
            hub.use_store(store)
            # Per address, where the store keeps limits (shared by a fleet with --redis).
            app.state.create_limiter = store.limiter("create", settings.rooms_per_minute, 60.0)
            hub.secret = settings.secret or await store.turn_secret()
            if settings.redis:  # signaling across instances (fleet.py)
                from p2pserver.fleet import Fleet
                from p2pserver.redisstore import RedisRoomStore

                assert isinstance(store.store, RedisRoomStore)
                fleet = Fleet(
                    store.store.client,
                    hub.on_fleet_message,
                    settings.redis_presence_ttl,
                    settings.redis,
                )
                fleet.on_resync = hub.resync_fleet
                await fleet.start()
                hub.fleet = fleet
            if settings.turn and app.state.turn is None:  # the CLI starts it before uvicorn
                from p2pserver.turn.workers import turn_server

                turn = turn_server(settings, secret=hub.secret)
                await turn.start()
                app.state.turn = turn
            interval = min(60.0, max(1.0, settings.room_ttl / 10))
            sweeper = asyncio.create_task(
                sweep_forever(hub, store, app.state.create_limiter, interval)
            )
            try:
                yield
            finally:
                sweeper.cancel()
                # Normally DrainingServer has done this already; here for other ASGI servers.
                await hub.close_all()
                if hub.fleet is not None:  # after close_all: its peers' leaves go out first
                    await hub.fleet.stop()
                    hub.fleet = None
                if app.state.turn is not None:
                    await app.state.turn.stop()
                    app.state.turn = None
        finally:
            hub.use_store(None)
            await store.close()

    metrics = Metrics(settings.metrics_allow)
    create_route = Route("/create-chat", create_chat, methods=["POST"])
    middleware = [
        Middleware(HttpMetrics, metrics=metrics),
        Middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type"],
            allow_credentials=False,
        ),
    ]
    handlers: dict[Any, Any] = {
        HTTPException: _http_error,
        StoreUnavailable: _unavailable,
        Exception: _server_error,
    }
    routes = [
        create_route,  # served by App.create_stack; here for 405s and url_for
        Route("/check-chat/{room_id}", check_chat, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        # /ws/{room_id}: signaling, dispatched by App itself.
        # The web client: its page at / and its scripts and styles under /static/. (A mount at
        # / would answer every unknown path itself, and GET /create-chat with 404, not 405.)
        Route("/", index, methods=["GET", "HEAD"]),
        Route("/check", check_page, methods=["GET", "HEAD"]),
        Mount("/static", WebFiles(directory=WEB_DIR), name="static"),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
    app = App(
        routes=routes,
        middleware=middleware,
        exception_handlers=handlers,
        lifespan=lifespan,
    )
    app.create_route = create_route
    app.state.settings = settings
    app.state.hub = hub
    app.state.turn = None
    app.state.metrics = metrics
    metrics.turn = lambda: app.state.turn.stats() if app.state.turn is not None else None
    metrics.signaling = lambda: {
        **hub.stats(),
        **hub.counts,
        "rooms_lost": hub.store.lost if hub.store is not None else 0,
    }
    app.state.create_limiter = None  # the store's, set by the lifespan (it keeps limits)
    return app
