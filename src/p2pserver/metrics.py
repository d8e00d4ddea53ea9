"""`GET /metrics`: Prometheus text format through prometheus-client (docs/operations.md, "Metrics").

Nothing here runs on the relay path. The TURN server and the signaling hub keep plain integer
counters (turn/stats.py, signaling.py); a custom collector reads them when Prometheus scrapes.
TURN names follow coturn's where it has one (`turn_total_allocations`,
`turn_total_traffic_peer_rcvp`, ...); the rest carry a `p2pserver_` prefix.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from p2pserver.config import IPNetwork

disable_created_metrics()  # no `_created` series beside every counter: nobody reads them

StatsSource = Callable[[], Mapping[str, int] | None]

# TURN counters with a coturn counterpart (prometheus-client adds `_total` to counters).
_TURN_COUNTERS = {
    "peer_rcvp": ("turn_total_traffic_peer_rcvp", "Datagrams received from peers and relayed"),
    "peer_rcvb": ("turn_total_traffic_peer_rcvb", "Payload bytes received from peers and relayed"),
    "peer_sentp": ("turn_total_traffic_peer_sentp", "Datagrams relayed from clients to peers"),
    "peer_sentb": ("turn_total_traffic_peer_sentb", "Payload bytes relayed from clients to peers"),
    "allocations_created": ("turn_new_allocation", "Allocations created"),
    "allocations_deleted": ("turn_deleted_allocation", "Allocations deleted or expired"),
    "faults": ("p2pserver_turn_faults", "Bugs caught in a TURN callback (each logged)"),
    "connections_reset": (
        "p2pserver_turn_connections_reset",
        "TCP/TLS connections reset before they were accepted",
    ),
}
_TURN_DROPS = {  # reason label -> stats key
    "malformed": "dropped",
    "peer_policy": "peer_denied",
    "peer_send_buffer": "peer_send_drops",
    "client_send_buffer": "client_write_drops",
}
_TURN_GAUGES = {
    "allocations": ("turn_total_allocations", "Allocations alive now"),
    "permissions": ("p2pserver_turn_permissions", "Permissions alive now"),
    "channels": ("p2pserver_turn_channels", "Channels bound now"),
}


class Metrics:
    """The registry behind /metrics, and who may read it (`--metrics-allow`)."""

    def __init__(self, allow: Iterable[IPNetwork]) -> None:
        self.allow = tuple(allow)
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU, fds
        self.http_requests = Counter(
            "p2pserver_http_requests",
            "HTTP requests answered, by route template (never a room id), method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.create_chat = Counter(
            "p2pserver_create_chat",
            "POST /create-chat answers, by result: created, rate-limited, bad-request",
            ["result"],
            registry=self.registry,
        )
        self.turn: StatsSource = lambda: None
        self.signaling: StatsSource = lambda: None
        self.registry.register(_Collector(self))

    def allowed(self, host: str | None) -> bool:
        if host is None:
            return False
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.allow)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        turn = self.metrics.turn()
        if turn is not None:
            yield from turn_metrics(turn)
        signaling = self.metrics.signaling()
        if signaling is not None:
            yield from signaling_metrics(signaling)


def turn_metrics(stats: Mapping[str, int]) -> Iterator[Metric]:
    """Metric families from a TURN stats snapshot (TurnServer.stats(); summed over workers)."""
    for key, (name, doc) in _TURN_COUNTERS.items():
        yield CounterMetricFamily(name, doc, value=stats.get(key, 0))
    for key, (name, doc) in _TURN_GAUGES.items():
        yield GaugeMetricFamily(name, doc, value=stats.get(key, 0))
    requests = CounterMetricFamily(
        "p2pserver_turn_requests", "STUN/TURN requests by method and transport",
        labels=["method", "transport"],
    )  # fmt: skip
    errors = CounterMetricFamily(
        "p2pserver_turn_error_responses", "Error responses by code", labels=["code"]
    )
    connections = CounterMetricFamily(
        "p2pserver_turn_connections", "TCP/TLS connections accepted", labels=["transport"]
    )
    for key, value in stats.items():
        kind, dot, rest = key.partition(".")
        if not dot:
            continue
        if kind == "requests":
            method, _, transport = rest.partition(".")
            requests.add_metric([method, transport], value)
        elif kind == "errors":
            errors.add_metric([rest], value)
        elif kind == "connections":
            connections.add_metric([rest], value)
    yield from (requests, errors, connections)
    yield CounterMetricFamily(
        "p2pserver_turn_challenges",
        "401 answers with a fresh NONCE: requests without or with stale credentials",
        value=stats.get("errors.401", 0) + stats.get("errors.438", 0),
    )
    yield CounterMetricFamily(
        "p2pserver_turn_quota_refusals",
        "Allocations refused: 486 (the user's quota) or 508 (the server is full)",
        value=stats.get("errors.486", 0) + stats.get("errors.508", 0),
    )
    drops = CounterMetricFamily(
        "p2pserver_turn_dropped", "Datagrams or messages dropped, by reason", labels=["reason"]
    )
    for reason, key in _TURN_DROPS.items():
        drops.add_metric([reason], stats.get(key, 0))
    yield drops
    open_now = GaugeMetricFamily(
        "p2pserver_turn_open_connections", "TCP/TLS connections open now", labels=["transport"]
    )
    for transport in ("tcp", "tls"):
        open_now.add_metric([transport], stats.get(f"open.{transport}", 0))
    yield open_now


def signaling_metrics(stats: Mapping[str, Any]) -> Iterator[Metric]:
    """Metric families from the signaling hub's stats (Hub.stats())."""
    gauges = {
        "connections": ("p2pserver_signaling_connections", "WebSockets open now"),
        "rooms": ("p2pserver_signaling_rooms", "Rooms with at least one peer now"),
        "peers": ("p2pserver_signaling_peers", "Peers joined to a room now"),
    }
    for key, (name, doc) in gauges.items():
        yield GaugeMetricFamily(name, doc, value=stats.get(key, 0))
    yield CounterMetricFamily(
        "p2pserver_rooms_lost",
        "New rooms whose write to the store failed after their id was given out (--db-sync "
        "normal; logged)",
        value=stats.get("rooms_lost", 0),
    )
    families: dict[str, CounterMetricFamily] = {
        "messages": CounterMetricFamily(
            "p2pserver_signaling_messages", "Signaling messages received, by type", labels=["type"]
        ),
        "join_failures": CounterMetricFamily(
            "p2pserver_signaling_join_failures", "Joins refused, by error code", labels=["reason"]
        ),
        "pin_lockouts": CounterMetricFamily(
            "p2pserver_pin_lockouts",
            "Join attempts refused because the room or the address is locked out (wrong PINs)",
            labels=["scope"],
        ),
    }
    for key, value in stats.items():
        kind, _, label = key.partition(".")
        if kind in families and label:
            families[kind].add_metric([label], value)
    yield from families.values()


class HttpMetrics:
    """ASGI middleware: count each HTTP answer by route template, method and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app raises before answering

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.http_requests.labels(
                self._route(scope), scope["method"], str(status)
            ).inc()

    @staticmethod
    def _route(scope: Scope) -> str:
        # Starlette's router leaves the route it matched in the scope (a partial match too: the
        # path matched, the method did not, 405). Unknown paths share one label: none per typo.
        # A CORS preflight is answered before routing, so it has a label of its own.
        route = scope.get("route")
        if route is not None:
            return str(getattr(route, "path", "other") or "/")
        if scope["method"] == "OPTIONS" and _has_header(scope, b"access-control-request-method"):
            return "preflight"
        return "other"


def _has_header(scope: Scope, name: bytes) -> bool:
    return any(key == name for key, _ in scope["headers"])
