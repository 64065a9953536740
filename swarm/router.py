"""Route planning: which chain of peers runs a model's layers for one request.

Owns `plan_route`, the cost model of DESIGN.md §5 (after Petals' router): a route is a
chain of (peer, layer range) covering [0, L); its estimated time per token is

    Σ layers / throughput  +  Σ (RTT/2 + per-hop cost) over the hops  (+ the last leg's RTT/2)

and the cheapest chain wins (Dijkstra over layer boundaries; each published record is an
edge from its first layer to its last). Ties go to the less loaded peers. Peers with an
unknown RTT are assumed `UNKNOWN_RTT_MS` away; a peer that publishes no throughput is
assumed `UNKNOWN_THROUGHPUT` layers per second.

Pure: no network, no jax. The node feeds it the verified records of the DHT.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from swarm.errors import InvalidRequestError, SwarmError

UNKNOWN_RTT_MS = 150.0  # Petals' assumption for a peer never pinged
UNKNOWN_THROUGHPUT = 100.0  # layers per second
DEFAULT_HOP_COST_MS = 5.0  # serialization, crypto and scheduling per hop when unmeasured
LOAD_PENALTY = 0.1  # each active session on a stage costs this share of its compute time


class NoRouteError(SwarmError):
    """No chain of known peers covers every layer of the model."""


class RecordLike(Protocol):
    peer_id: str
    public_key: bytes
    layers: tuple[int, int]
    n_layers: int
    address: str
    throughput: float
    load: float


@dataclass(frozen=True)
class Hop:
    """One stage of a planned route, with the estimate that chose it."""

    peer_id: str
    public_key: bytes
    address: str
    layers: tuple[int, int]
    cost_ms: float


def stage_cost_ms(record: RecordLike, rtt_ms: float | None, hop_cost_ms: float) -> float:
    """The estimated per-token milliseconds one record adds to a route."""
    first, last = record.layers
    throughput = record.throughput if record.throughput > 0 else UNKNOWN_THROUGHPUT
    compute = (last - first) / throughput * 1000.0 * (1.0 + LOAD_PENALTY * max(record.load, 0.0))
    rtt = UNKNOWN_RTT_MS if rtt_ms is None else rtt_ms
    return compute + rtt / 2.0 + hop_cost_ms


def plan_route(
    records: Iterable[RecordLike],
    n_layers: int,
    *,
    rtt_ms: Mapping[str, float] | None = None,
    hop_cost_ms: float = DEFAULT_HOP_COST_MS,
    exclude: Iterable[str] = (),
    model_id: str = "the model",
) -> list[Hop]:
    """The cheapest chain covering [0, n_layers), as hops in layer order.

    rtt_ms: measured round trips by peer id (the local node: 0). exclude: addresses not
    to use (peers that just failed). Raises NoRouteError naming the first layer no
    usable peer serves.
    """
    rtt_ms = rtt_ms or {}
    banned = set(exclude)
    edges: dict[int, list[tuple[float, Hop]]] = {}
    for record in records:
        first, last = record.layers
        if record.n_layers != n_layers or not 0 <= first < last <= n_layers or record.address in banned:
            continue
        cost = stage_cost_ms(record, rtt_ms.get(record.peer_id), hop_cost_ms)
        hop = Hop(record.peer_id, record.public_key, record.address, (first, last), cost)
        edges.setdefault(first, []).append((cost, hop))
    # Dijkstra from layer 0 to layer n_layers; a tie breaks towards fewer hops.
    best: dict[int, tuple[float, int]] = {0: (0.0, 0)}
    came_from: dict[int, Hop] = {}
    frontier: list[tuple[float, int, int]] = [(0.0, 0, 0)]
    while frontier:
        cost, hops, layer = heapq.heappop(frontier)
        if (cost, hops) > best.get(layer, (float("inf"), 0)) or layer == n_layers:
            continue
        for edge_cost, hop in sorted(edges.get(layer, ()), key=lambda item: (item[0], item[1].peer_id)):
            end = hop.layers[1]
            candidate = (cost + edge_cost, hops + 1)
            if candidate < best.get(end, (float("inf"), 0)):
                best[end] = candidate
                came_from[end] = hop
                heapq.heappush(frontier, (candidate[0], candidate[1], end))
    if n_layers not in best:
        reached = max(best)
        raise NoRouteError(
            f"no reachable peer serves layers {reached}-{n_layers} of {model_id}"
            + (f" (excluded after failures: {', '.join(sorted(banned))})" if banned else "")
        )
    route: list[Hop] = []
    layer = n_layers
    while layer:
        hop = came_from[layer]
        route.append(hop)
        layer = hop.layers[0]
    return route[::-1]


def even_split(n_layers: int, count: int) -> list[tuple[int, int]]:
    """[0, n_layers) cut into `count` contiguous ranges of (nearly) equal size."""
    if not 1 <= count <= n_layers:
        raise InvalidRequestError(f"cannot split {n_layers} layers into {count} ranges")
    edges = [round(i * n_layers / count) for i in range(count + 1)]
    return list(itertools.pairwise(edges))


def estimate_ms(route: Iterable[Hop]) -> float:
    """The per-token time a route was chosen for."""
    return sum(hop.cost_ms for hop in route)
