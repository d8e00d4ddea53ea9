"""The TURN server's numbers: counters that only go up, and gauges for what is alive now.

Names follow coturn's Prometheus metrics so an exporter maps them one to one (docs/turn.md,
"Statistics"): `peer_rcvb` is coturn's turn_total_traffic_peer_rcvb, `allocations` its
turn_total_allocations. The relayed traffic is counted on the hot path per allocation (one integer
add on an object already in hand); when an allocation ends its counts are folded in here, so the
totals never go down.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Protocol

from p2pserver.turn.stun import REQUEST_METHODS


class Traffic(Protocol):
    """What an allocation counts as it relays (allocation.Allocation)."""

    peer_rcvp: int  # datagrams from peers, relayed to the client
    peer_rcvb: int  # their payload bytes
    peer_sentp: int  # datagrams from the client, relayed to peers
    peer_sentb: int  # their payload bytes
    peer_denied: int  # datagrams from peers without a permission, or the policy denies, dropped
    permissions: dict
    channels: dict

    @property
    def send_drops(self) -> int: ...


COUNTERS = (
    "requests",  # STUN/TURN requests decoded (not indications, not ChannelData)
    "bad_requests",  # answered 400/420 before reaching a handler
    "unauthenticated",  # answered 401/438 (or 400 for missing credentials)
    "dropped",  # messages dropped unanswered: not STUN, broken, or an unusable indication
    "faults",  # bugs caught in a callback (docs/turn.md, "Faults")
    "connections_reset",  # TCP/TLS connections reset before they were accepted
    "allocations_created",
    "allocations_deleted",
    "peer_rcvp",
    "peer_rcvb",
    "peer_sentp",
    "peer_sentb",
    "peer_send_drops",  # datagrams to peers the OS refused (full buffer, ICMP error)
    "peer_denied",  # datagrams from peers dropped: no permission, or the peer policy denies
    "client_write_drops",  # messages to a client dropped: its send buffer (or the OS's) is full
)


# Keys of a stats snapshot that say what is alive now rather than count (TurnServer.stats()):
# a worker that dies takes them along, while its counters stay in the totals (workers.py).
GAUGES = frozenset(
    {"allocations", "tcp_connections", "permissions", "channels", "open.tcp", "open.tls"}
)


class TurnStats:
    __slots__ = (*COUNTERS, "labelled")

    def __init__(self) -> None:
        for name in COUNTERS:
            setattr(self, name, 0)
        # Counts with labels in the key, flat so that worker processes' counts add up key by
        # key: "requests.allocate.udp", "errors.401", "connections.tls" (docs/operations.md).
        self.labelled: Counter[str] = Counter()

    # Declared for type checkers; __init__ sets them all to 0.
    requests: int
    bad_requests: int
    unauthenticated: int
    dropped: int
    faults: int
    connections_reset: int
    allocations_created: int
    allocations_deleted: int
    peer_rcvp: int
    peer_rcvb: int
    peer_sentp: int
    peer_sentb: int
    peer_send_drops: int
    peer_denied: int
    client_write_drops: int

    def count_request(self, method: int, transport: str) -> None:
        self.labelled[_REQUEST_KEYS[method, transport]] += 1  # an IntEnum hashes as its int

    def count_error(self, code: int) -> None:
        self.labelled[f"errors.{code}"] += 1

    def count_connection(self, transport: str) -> None:
        self.labelled[f"connections.{transport}"] += 1

    def retire(self, allocation: Traffic) -> None:
        """An allocation ended: keep what it relayed in the totals."""
        self.peer_rcvp += allocation.peer_rcvp
        self.peer_rcvb += allocation.peer_rcvb
        self.peer_sentp += allocation.peer_sentp
        self.peer_sentb += allocation.peer_sentb
        self.peer_send_drops += allocation.send_drops
        self.peer_denied += allocation.peer_denied
        self.allocations_deleted += 1

    def snapshot(self, live: Iterable[Traffic]) -> dict[str, int]:
        """Every counter, the traffic of the allocations alive now included."""
        counts = {name: getattr(self, name) for name in COUNTERS}
        counts["permissions"] = counts["channels"] = 0  # gauges: alive now
        for allocation in live:
            counts["permissions"] += len(allocation.permissions)
            counts["channels"] += len(allocation.channels)
            counts["peer_denied"] += allocation.peer_denied
            counts["peer_rcvp"] += allocation.peer_rcvp
            counts["peer_rcvb"] += allocation.peer_rcvb
            counts["peer_sentp"] += allocation.peer_sentp
            counts["peer_sentb"] += allocation.peer_sentb
            counts["peer_send_drops"] += allocation.send_drops
        counts.update(self.labelled)
        return counts


# "requests.<method>.<transport>" for every request the core answers (stun.decode refuses
# the other methods before they are counted).
_REQUEST_KEYS = {
    (int(method), transport): f"requests.{method.name.lower()}.{transport}"
    for method in REQUEST_METHODS
    for transport in ("udp", "tcp", "tls")
}
