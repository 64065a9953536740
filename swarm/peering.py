"""The node's side of the swarm: its pipeline stage, its DHT records, and routes through peers.

Owns `Peering`, which a node that joins a network holds:
- a `StageServer` for the layers this node holds (peers route their requests through it),
  sharing the weights of the node's own engine;
- a publisher thread that keeps this node's record (model, layers, stage address, measured
  throughput, current load) in the DHT through the DHT process's local socket;
- `route()`, the cheapest chain of stages for the model from the verified records
  (`swarm.router`), excluding peers that just failed unless they published again since;
- `requester()`, a `Requester` that fails over along new routes (DESIGN.md §5);
- `network_models` and `delegated()`: the models other peers serve whole, and a request
  for one of them handed to such a peer (`swarm.delegation`); its stage takes such
  requests for this node's model through the `delegate` runner it is given;
- the node's credit desk (`swarm.credit_desk`) and pool desk (`swarm.pool_desk`): in
  private mode (`pool.private_mode`) routes use only pool members (and mDNS LAN peers
  when `pool.private_mode_allow_lan`), while the stage keeps serving everyone; a
  member refreshes the pool's member list from its owner every `POOL_REFRESH_S`.

Throughput is measured once at start: the median time of a one-token forward through
this node's layers. The per-hop cost is measured too: a ping over an encrypted channel to
this node's own stage.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from swarm.batching import SlotBatch
from swarm.config import Config
from swarm.credit_desk import CreditDesk
from swarm.delegation import DelegatedRun, NetworkModels, NoHoldersError, Runner
from swarm.dht_client import DhtClient, DhtError, DhtUnavailable
from swarm.identity import Identity
from swarm.ledger import Ledger
from swarm.pipeline import Embedder, Requester, RouteStage, ping_stage
from swarm.pool import PoolError, PoolStore
from swarm.pool_desk import PoolDesk, fetch_state, owner_address, private_peers
from swarm.records import PeerRecord
from swarm.router import DEFAULT_HOP_COST_MS, NoRouteError, estimate_ms, plan_route
from swarm.stage import StageConfig, StageEngine, StageServer

log = logging.getLogger(__name__)

REPUBLISH_S = 20.0  # even unchanged, so a restarted DHT process learns the record again
LOAD_REPUBLISH_S = 5.0  # a changed load is published at most this often
PEERS_REFRESH_S = 10.0  # how long measured RTTs are reused
RETRY_S = 5  # seconds between attempts to reach a DHT process that is down
MAX_STAGE_PROBES = 16  # peers the DHT has not timed, pinged directly per route
EXCLUSION_S = 30.0  # how long a peer that failed a request is left out of its new routes
POOL_REFRESH_S = 30.0  # how often a pool member asks the owner for the current member list


def _stage_batch(engine: Any, config: Config) -> SlotBatch | None:
    """The stage's shared cache: peers' sessions' decode steps run together."""
    inference = config.inference
    if not inference.batch_context:
        return None
    limit = min(inference.batch_context, engine.max_context)
    return SlotBatch(engine, inference.max_concurrent_requests, limit)


class Peering:
    """This node as a member of the swarm (see the module docstring)."""

    def __init__(
        self,
        engine: Any,
        opened: Any,
        model_id: str,
        identity: Identity,
        config: Config,
        data_dir,
        prefix_cache: Any = None,
        delegate: Runner | None = None,
        batch: SlotBatch | None = None,
    ):
        self.model_id = model_id
        self.identity = identity
        self.config = config
        self.n_layers = opened.config.n_layers
        self.layers = (engine.first, engine.last)
        self.dht = DhtClient(data_dir)
        whole = self.layers == (0, self.n_layers)
        # Requests entering here need the embedding when routed; a whole-model stage needs
        # it to decode on its own when a peer hands it a whole request.
        self.embedder = Embedder(opened.gguf, opened.config)
        self.stage_engine = StageEngine(
            engine.config, engine.weights, engine.first, engine.last, engine.settings
        )
        network = config.network
        # Pays the stages this node's requests use, and is paid by those it serves.
        self.pool_store = PoolStore(data_dir)
        self.credits = CreditDesk(
            Ledger(data_dir, identity.peer_id),
            identity,
            network.gossip_network_id,
            pool_state=self._pool_shown,
        )
        self._pool_checked = 0.0
        self.stage = StageServer(
            self.stage_engine,
            identity,
            StageConfig(
                model_id=model_id,
                network_id=network.gossip_network_id,
                host=network.listen_address,
                port=network.peer_port,
                hop_timeout=network.stage_timeout_s,
                max_sessions=config.inference.max_concurrent_requests,
                prefill_chunk=config.inference.prefill_chunk,
            ),
            embed=self.embedder if whole else None,
            # A whole-model node's own batch: peers' sessions decode in its requests' steps.
            batch=batch if batch is not None else _stage_batch(self.stage_engine, config),
            prefix_cache=prefix_cache if whole and config.network.prefix_sharing else None,
            credits=self.credits,
            pool=PoolDesk(self.pool_store, identity, config.pool.max_pool_size),
            delegate=delegate,
        )
        self.network_models = NetworkModels(
            self.dht, network.gossip_network_id, identity.peer_id, self.private_peers, self.rtt_ms
        )
        self.tokenizer = opened.tokenizer
        self.throughput = 0.0
        self.hop_cost_ms = DEFAULT_HOP_COST_MS
        self._stopping = threading.Event()
        self._rtt: dict[str, float] = {}
        self._rtt_at = 0.0
        self._stage_rtt: dict[str, tuple[float | None, float]] = {}
        self._published: tuple | None = None
        self._published_at = 0.0
        self._unreachable = False

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Listens for peers, measures this node, and starts publishing."""
        self.stage.start()
        self.throughput = self._measure_throughput()
        self.hop_cost_ms = self._measure_hop_cost()
        log.info(
            "stage %s serves layers %d-%d of %s at %.0f layers/s (hop cost %.2f ms)",
            self.stage.address,
            *self.layers,
            self.model_id,
            self.throughput,
            self.hop_cost_ms,
        )
        threading.Thread(target=self._publish_loop, name="publish", daemon=True).start()

    def close(self) -> None:
        self._stopping.set()
        self.stage.close()

    def _measure_throughput(self) -> float:
        """Layers per second of a one-token forward (median of 5, after one to compile)."""
        engine = self.stage_engine
        hidden = np.zeros((1, engine.config.d_model), np.float32)
        times = []
        for _ in range(6):
            cache = engine.new_cache(engine.cache_capacity(1))
            began = time.perf_counter()
            engine.forward(hidden, 0, cache)
            times.append(time.perf_counter() - began)
        return (self.layers[1] - self.layers[0]) / max(statistics.median(times[1:]), 1e-6)

    def _measure_hop_cost(self) -> float:
        """Milliseconds of an encrypted ping round trip to this node's own stage (median of 5)."""
        network_id = self.config.network.gossip_network_id
        times = [ping_stage(self.identity, network_id, self.stage.address, None, 5.0) for _ in range(5)]
        measured = [t for t in times if t is not None]
        return statistics.median(measured) if measured else DEFAULT_HOP_COST_MS

    # -- publishing ----------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        stats = self.stage.stats()
        return {
            "model_id": self.model_id,
            "layers": list(self.layers),
            "n_layers": self.n_layers,
            "address": self.stage.address,
            "throughput": round(self.throughput, 1),
            "load": float(stats["sessions"]),
        }

    def _publish_loop(self) -> None:
        while not self._stopping.is_set():
            record = self.record()
            content = tuple(sorted((k, str(v)) for k, v in record.items()))
            now = time.monotonic()
            due = now - self._published_at >= REPUBLISH_S
            changed = content != self._published and now - self._published_at >= LOAD_REPUBLISH_S
            if due or changed or self._published is None:
                try:
                    self.dht.publish([record])
                    self._published, self._published_at = content, now
                    self._unreachable = False
                except (DhtUnavailable, DhtError) as error:
                    if not self._unreachable:
                        log.warning("publishing to the DHT failed (retrying every %d s): %s", RETRY_S, error)
                    self._unreachable = True
                    self._stopping.wait(RETRY_S)
            if time.monotonic() - self._pool_checked >= POOL_REFRESH_S:
                self._pool_checked = time.monotonic()
                self._refresh_pool()
            self._stopping.wait(1.0)

    def _pool_shown(self) -> dict[str, Any] | None:
        """This node's pool's signed member list, shown to stages with its balance report."""
        state = self.pool_store.state()
        return state.to_dict() if state is not None and self.identity.peer_id in state.member_ids() else None

    def _refresh_pool(self) -> None:
        """A member asks the owner for the pool's current member list (it may have been removed)."""
        state = self.pool_store.state()
        if state is None or state.pool_id == self.identity.peer_id:
            return
        address = owner_address(state, self.identity)
        with contextlib.suppress(NoRouteError):
            for record in self.records():
                if record.peer_id == state.pool_id:
                    address = record.address
        try:
            newer = fetch_state(self.identity, self.config.network.gossip_network_id, address, state)
            if newer.newer_than(state):
                self.pool_store.save(newer)
        except PoolError as error:
            log.info("refreshing pool %s from its owner failed: %s", state.name, error)

    # -- routing -------------------------------------------------------------------

    def records(self) -> list[PeerRecord]:
        """The valid records of this network for the model, this node's own included."""
        network_id = self.config.network.gossip_network_id
        try:
            found = self.dht.lookup(self.model_id)
        except (DhtUnavailable, DhtError) as error:
            raise NoRouteError(f"the DHT cannot be asked for peers: {error}") from None
        return [r for r in found if r.valid(network_id) and r.model_id == self.model_id]

    def rtt_ms(self) -> dict[str, float]:
        """Measured DHT round trips by peer id (this node: 0), refreshed every few seconds."""
        if time.monotonic() - self._rtt_at > PEERS_REFRESH_S:
            rtt: dict[str, float] = {}
            try:
                for peer in self.dht.peers():
                    if peer.get("latency_ms") is not None:
                        rtt[str(peer["peer_id"])] = float(peer["latency_ms"])
            except (DhtUnavailable, DhtError):
                pass
            rtt[self.identity.peer_id] = 0.0
            self._rtt, self._rtt_at = rtt, time.monotonic()
        return self._rtt

    def _stage_rtt_ms(self, record: PeerRecord) -> float | None:
        """A measured round trip to a peer's stage (an encrypted ping), cached; None if it
        does not answer. Used for peers the DHT has not timed yet."""
        cached = self._stage_rtt.get(record.address)
        if cached is not None and time.monotonic() - cached[1] < PEERS_REFRESH_S:
            return cached[0]
        network_id = self.config.network.gossip_network_id
        rtt = ping_stage(self.identity, network_id, record.address, record.public_key)
        self._stage_rtt[record.address] = (rtt, time.monotonic())
        return rtt

    def route(self, excluded: Mapping[str, float] | None = None) -> list[RouteStage]:
        """The cheapest chain of stages for the model; raises NoRouteError."""
        excluded = excluded or {}
        now = time.time()

        def usable(record: PeerRecord) -> bool:
            # A failed peer is skipped for EXCLUSION_S, and after that until it publishes
            # again (a restart does; a stalled process's DHT may keep re-signing, hence both).
            since = excluded.get(record.address)
            return since is None or (now - since >= EXCLUSION_S and record.issued > since)

        records = [record for record in self.records() if usable(record)]
        allowed = self.private_peers()
        if allowed is not None:
            records = [record for record in records if record.peer_id in allowed]
        rtt = dict(self.rtt_ms())
        for record in records[:MAX_STAGE_PROBES]:
            if record.peer_id not in rtt:
                measured = self._stage_rtt_ms(record)
                if measured is not None:
                    rtt[record.peer_id] = measured
        try:
            hops = plan_route(
                records,
                self.n_layers,
                rtt_ms=rtt,
                hop_cost_ms=self.hop_cost_ms,
                model_id=self.model_id,
            )
        except NoRouteError as error:
            if allowed is None:
                raise
            raise NoRouteError(
                f"private mode: only pool members may serve this request, and {error}"
            ) from None
        log.info(
            "route for %s: %s (estimated %.1f ms per token)",
            self.model_id,
            " -> ".join(f"{h.peer_id[:8]}@{h.address}[{h.layers[0]}-{h.layers[1]}]" for h in hops),
            estimate_ms(hops),
        )
        return [RouteStage(hop.address, hop.public_key, hop.layers) for hop in hops]

    def private_peers(self) -> frozenset[str] | None:
        """Who this node's requests may route through in private mode; None when it is off."""
        pool = self.config.pool
        if not pool.private_mode:
            return None
        lan: list[str] = []
        if pool.private_mode_allow_lan:
            with contextlib.suppress(DhtUnavailable, DhtError):
                lan = [str(peer["peer_id"]) for peer in self.dht.peers() if peer.get("source") == "mdns"]
        return private_peers(
            self.pool_store,
            self.identity,
            private_mode=True,
            allow_lan=pool.private_mode_allow_lan,
            lan_peers=lan,
        )

    def prefix_peers(self) -> list[tuple[str, bytes]]:
        """(address, public key) of other peers holding the whole model, nearest first:
        those a prompt prefix's KV can be fetched from."""
        rtt = self.rtt_ms()
        allowed = self.private_peers()  # in private mode a prompt's prefix stays in the pool
        whole = [
            record
            for record in self.records()
            if tuple(record.layers) == (0, self.n_layers)
            and record.peer_id != self.identity.peer_id
            and (allowed is None or record.peer_id in allowed)
        ]
        whole.sort(key=lambda record: rtt.get(record.peer_id, float("inf")))
        return [(record.address, record.public_key) for record in whole]

    def requester(self) -> Requester:
        """A requester over the current best route, failing over to new ones."""
        network = self.config.network
        return Requester(
            self.identity,
            self.embedder,
            self.tokenizer,
            self.route(),
            model_id=self.model_id,
            network_id=network.gossip_network_id,
            timeout=network.stage_timeout_s,
            reroute=self.route,
            failover_timeout=network.failover_timeout_s,
            credits=self.credits,
        )

    def delegated(self, request: Any) -> DelegatedRun:
        """A request for another model (`request.model`), to be handed to the nearest peer
        serving it whole; NoHoldersError when no such peer is known, PeerUnavailableError
        when the DHT cannot be asked."""
        holders, depth = self.network_models.find(request.model)
        if not holders:
            where = " among this node's pool" if self.private_peers() is not None else ""
            raise NoHoldersError(f"no peer{where} serves model {request.model!r}")
        network = self.config.network
        return DelegatedRun(
            request,
            holders,
            self.identity,
            network.gossip_network_id,
            timeout=network.stage_timeout_s,
            credits=self.credits,
            paid_layers=depth,
        )

    def info(self) -> dict[str, Any]:
        return {
            "peer_id": self.identity.peer_id,
            "network_id": self.config.network.gossip_network_id,
            "stage": {"address": self.stage.address, "layers": list(self.layers), **self.stage.stats()},
            "throughput_layers_s": round(self.throughput, 1),
            "hop_cost_ms": round(self.hop_cost_ms, 3),
        }
