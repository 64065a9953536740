"""The Kademlia layer of the DHT: record storage, the merging crawl, the protocol and the server.

Owns Kademlia (the `kademlia` package over UDP) where a key holds a set of signed records
(`swarm.records`) from many publishers:
- `RecordStorage`: record sets by key digest; a store merges into what a node holds
  instead of replacing it, keeping only valid records filed under their own key.
- `MergingCrawl`: a lookup that asks every responding node near a key and merges all
  their sets, with a bounded wait for stragglers.
- `SwarmProtocol`: Kademlia's RPCs hardened against malformed input, plus `hello` (a
  signed answer proving that the key behind a node id is held, with the network id it
  serves) and `exchange` (peer exchange: up to 20 verified peers of a network).
- `SwarmServer`: the Kademlia server over them, with a book of what it knows of peers.

The Kademlia node id is the 20-byte digest behind the peer id (`node_id_of`,
`peer_id_of_node`), so either names the other.

The process around this layer (bootstrap, publishing, LAN discovery, the local API) is
`swarm.dht`. Never imports jax or numpy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import heapq
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kademlia.network import Server
from kademlia.node import Node, NodeHeap
from kademlia.protocol import KademliaProtocol
from kademlia.storage import IStorage
from kademlia.utils import digest

from swarm.identity import Identity, peer_id_of, verify
from swarm.records import PeerRecord, catalog_key, decode_set, encode_chunks, encode_set, merge, record_key

log = logging.getLogger("swarm.dht")  # one logger for the whole DHT process

RPC_TIMEOUT_S = 3.0  # rpcudp's default is 5 s
STRAGGLER_S = 1.0  # how long a crawl with nothing left to ask waits for the last answers
SILENT_S = 60.0  # a node that did not answer is not asked again this long, whoever names it
STORE_CHUNK_BYTES = 7000  # rpcudp refuses a request over 8 KiB, so big sets go in chunks
MAX_STORED_KEYS = 4096  # least recently stored keys go first
MAX_BOOK_ENTRIES = 4096  # peers this node keeps notes on; the longest unheard go first
HELLO_PREFIX = b"swarm-dht-hello-v1\0"  # domain separation for hello signatures
EXCHANGE_PEERS = 20
EXCHANGE_FRESH_S = 900.0  # only peers seen this recently are passed on
INTRODUCE_INTERVAL_S = 60.0  # hello + exchange with one peer at most this often


def node_id_of(peer_id: str) -> bytes:
    """The Kademlia node id behind a peer id (its base32 digest, decoded)."""
    return base64.b32decode(peer_id.upper())


def peer_id_of_node(node_id: bytes) -> str:
    return base64.b32encode(node_id).decode("ascii").lower()


def is_node_id(value: Any) -> bool:
    return isinstance(value, bytes) and len(value) == 20


def _nodes(raw: Any, own_id: bytes) -> list[Node]:
    """The well-formed `(id, ip, port)` triples in a peer's answer, this node excluded."""
    nodes = []
    for item in raw if isinstance(raw, list) else []:
        if (
            isinstance(item, list | tuple)
            and len(item) == 3
            and is_node_id(item[0])
            and item[0] != own_id
            and isinstance(item[1], str)
            and isinstance(item[2], int)
            and 0 < item[2] < 65536
        ):
            nodes.append(Node(item[0], item[1], item[2]))
    return nodes


def _belongs(record: PeerRecord, key: bytes) -> bool:
    """Whether `record` is stored under the key its own network and model name, or under its
    network's catalog key."""
    return key in (
        digest(record_key(record.network_id, record.model_id)),
        digest(catalog_key(record.network_id)),
    )


class RecordStorage(IStorage):
    """Record sets by key digest. A store merges the incoming set into the held one.

    Only records that are validly signed, current, and stored under the key of their own
    network and model (or their network's catalog) are kept, so a forged or misfiled set
    changes nothing.
    """

    def __init__(self, max_keys: int = MAX_STORED_KEYS) -> None:
        self.max_keys = max_keys
        self._sets: OrderedDict[bytes, tuple[float, list[PeerRecord]]] = OrderedDict()

    def __setitem__(self, key: bytes, value: Any) -> None:
        if not is_node_id(key):
            return
        incoming = [record for record in decode_set(value) if _belongs(record, key)]
        if not incoming:
            return
        merged = merge([self._live(key), incoming])
        if merged:
            self._sets[key] = (time.monotonic(), merged)
            self._sets.move_to_end(key)
        while len(self._sets) > self.max_keys:
            self._sets.popitem(last=False)

    def _live(self, key: bytes) -> list[PeerRecord]:
        now = time.time()
        _, records = self._sets.get(key, (0.0, []))
        return [record for record in records if record.expires > now]

    def records(self, key: bytes) -> list[PeerRecord]:
        """The current records under `key` (verified when they were stored)."""
        return self._live(key) if isinstance(key, bytes) else []

    def get(self, key: bytes, default: Any = None) -> Any:
        records = self.records(key)
        return encode_set(records) if records else default

    def __getitem__(self, key: bytes) -> str:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, str]]:
        cutoff = time.monotonic() - seconds_old
        keys = [key for key, (stored, _) in self._sets.items() if stored <= cutoff]
        return [(key, value) for key in keys if (value := self.get(key)) is not None]

    def __iter__(self) -> Iterator[tuple[bytes, str]]:
        keys = list(self._sets)
        return iter([(key, value) for key in keys if (value := self.get(key)) is not None])


class MergingCrawl:
    """Asks the nodes nearest a key for its record set, collecting every set found rather
    than stopping at the first one; used to look records up, to find where to store them,
    and (with this node's own id as the key) to fill the routing table when bootstrapping.

    Unlike kademlia's round-based crawls, this keeps up to `alpha` queries in flight and
    starts the next as soon as one ends, and once nothing is left to ask it waits at most
    `STRAGGLER_S` for the last answers: a live peer answers in milliseconds, and every set
    is held by k nodes, so a dead node costs a lookup that long instead of `RPC_TIMEOUT_S`
    per round. `found` holds what arrived so far, so a caller out of time can use it.
    """

    def __init__(self, protocol: SwarmProtocol, key: Node, peers: list[Node], ksize: int, alpha: int) -> None:
        self.protocol = protocol
        self.key = key
        self.ksize = ksize
        self.alpha = alpha
        self.nearest = NodeHeap(key, ksize)
        self.nearest.push(peers)
        self.found: list[list[PeerRecord]] = []
        self.answered: list[Node] = []

    def nearest_answered(self) -> list[Node]:
        """The k nodes nearest the key among those that answered."""
        return heapq.nsmallest(self.ksize, self.answered, key=self.key.distance_to)

    async def find(self) -> list[list[PeerRecord]]:
        # Queries still running when the crawl ends finish by themselves (rpcudp's timeout).
        in_flight: dict[asyncio.Future[tuple[bool, Any]], Node] = {}
        while True:
            for peer in self.nearest.get_uncontacted()[: self.alpha - len(in_flight)]:
                self.nearest.mark_contacted(peer)
                in_flight[asyncio.ensure_future(self.protocol.call_find_value(peer, self.key))] = peer
            if not in_flight:
                return self.found
            idle = not self.nearest.get_uncontacted()
            done, _ = await asyncio.wait(
                in_flight, timeout=STRAGGLER_S if idle else None, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                return self.found
            for future in done:
                peer = in_flight.pop(future)
                answered, result = future.result()
                if not answered:
                    self.nearest.remove([peer.id])
                    continue
                self.answered.append(peer)
                if isinstance(result, dict):  # {"value": set, "nodes": [...]} (see rpc_find_value)
                    self.found.append(decode_set(result.get("value")))
                    result = result.get("nodes")
                server = self.protocol.server
                self.nearest.push(
                    [node for node in _nodes(result, server.node.id) if not server.silent(node)]
                )


@dataclass
class PeerInfo:
    """What this node knows about one DHT peer beyond its routing-table entry."""

    host: str
    port: int
    source: str  # bootstrap, invite, mdns, exchange, cache or contact (it reached us first)
    last_seen: float  # unix time of the last message from it
    latency_ms: float | None = None
    network_id: str | None = None  # the network it says it serves
    verified: bool = False  # it answered a hello signed by the key behind its node id
    introduced: float = -INTRODUCE_INTERVAL_S  # monotonic time of the last hello sent to it


class SwarmProtocol(KademliaProtocol):
    """Kademlia's RPCs hardened against malformed input, with `hello` and `exchange` added.

    rpcudp turns a call of an undefined attribute (`self.hello(address, ...)`) into a remote
    call of `rpc_hello` on the peer at `address`.
    """

    def __init__(self, server: SwarmServer) -> None:
        super().__init__(server.node, server.storage, server.ksize)
        self._wait_timeout = RPC_TIMEOUT_S
        self.server = server

    async def _solve_datagram(self, datagram: bytes, address: tuple[str, int]) -> None:
        try:
            await super()._solve_datagram(datagram, address)
        except Exception as error:  # anyone can send any datagram
            log.debug("dropped a malformed datagram from %s: %s", address, error)

    async def _accept_request(self, msg_id: bytes, data: Any, address: tuple[str, int]) -> None:
        try:
            await super()._accept_request(msg_id, data, address)
        except Exception as error:
            log.debug("dropped a malformed request from %s: %s", address, error)

    def welcome_if_new(self, node: Node) -> None:
        if not is_node_id(node.id) or node.id == self.source_node.id:
            return
        new = self.router.is_new_node(node)
        self.server.touch(node)
        if not new:
            # Kademlia refreshes a known contact on every message: its address may have changed
            # (a restarted peer keeps its id but not its port), and it becomes the most recent.
            self.router.add_contact(node)
            return
        super().welcome_if_new(node)
        if not self.router.is_new_node(node):
            self.server.on_contact(node)

    def handle_call_response(self, result: tuple[bool, Any], node: Node) -> tuple[bool, Any]:
        if not result[0]:
            self.server.went_silent(node)
        return super().handle_call_response(result, node)

    async def call_store(self, node_to_ask: Node, key: bytes, value: Any) -> tuple[bool, Any]:
        results = []
        for chunk in encode_chunks(decode_set(value), STORE_CHUNK_BYTES):
            results.append(await super().call_store(node_to_ask, key, chunk))
        return (bool(results) and all(answered for answered, _ in results), None)

    def rpc_find_value(self, sender: tuple[str, int], nodeid: bytes, key: bytes) -> Any:
        # The neighbors come with the value so that a merging crawl keeps going past it.
        nodes = self.rpc_find_node(sender, nodeid, key)
        value = self.storage.get(key)
        return nodes if value is None else {"value": value, "nodes": nodes}

    def rpc_hello(self, sender: tuple[str, int], nodeid: bytes, network_id: str, nonce: bytes) -> Any:
        if not isinstance(network_id, str) or not isinstance(nonce, bytes) or len(nonce) > 64:
            return None
        self.welcome_if_new(Node(nodeid, sender[0], sender[1]))
        self.server.declared(nodeid, network_id)
        own_network = self.server.network_id
        signature = self.server.identity.sign(HELLO_PREFIX + nonce + own_network.encode())
        return [self.server.identity.public_key, own_network, signature]

    def rpc_exchange(self, sender: tuple[str, int], nodeid: bytes, network_id: str) -> Any:
        if not isinstance(network_id, str):
            return None
        self.welcome_if_new(Node(nodeid, sender[0], sender[1]))
        self.server.declared(nodeid, network_id)
        return {"network_id": self.server.network_id, "peers": self.server.sample(network_id, nodeid)}


class SwarmServer(Server):
    """A Kademlia server whose keys hold merged record sets, with a book of what it knows of peers."""

    protocol_class = SwarmProtocol
    protocol: SwarmProtocol

    def __init__(self, identity: Identity, network_id: str) -> None:
        super().__init__(ksize=20, alpha=3, node_id=node_id_of(identity.peer_id), storage=RecordStorage())
        self.identity = identity
        self.network_id = network_id
        self.book: dict[bytes, PeerInfo] = {}
        # How an address we are about to contact was found, until it answers.
        self.pending_sources: dict[tuple[str, int], str] = {}
        # Monotonic time each recently unresponsive node last failed to answer.
        self._silent: dict[bytes, float] = {}
        self.on_contact: Callable[[Node], object] = lambda node: None

    def _create_protocol(self) -> SwarmProtocol:
        return SwarmProtocol(self)

    def contacts(self) -> list[Node]:
        return [node for bucket in self.protocol.router.buckets for node in bucket.get_nodes()]

    def touch(self, node: Node) -> PeerInfo:
        """Notes that `node` was heard from just now."""
        info = self.book.get(node.id)
        if info is None:
            if len(self.book) >= MAX_BOOK_ENTRIES:
                del self.book[min(self.book, key=lambda node_id: self.book[node_id].last_seen)]
            source = self.pending_sources.pop((node.ip, node.port), "contact")
            info = self.book[node.id] = PeerInfo(node.ip, node.port, source, time.time())
        info.host, info.port, info.last_seen = node.ip, node.port, time.time()
        self._silent.pop(node.id, None)
        return info

    def went_silent(self, node: Node) -> None:
        now = time.monotonic()
        if len(self._silent) > MAX_BOOK_ENTRIES:
            self._silent = {node_id: at for node_id, at in self._silent.items() if now - at < SILENT_S}
        self._silent[node.id] = now

    def silent(self, node: Node) -> bool:
        """Whether `node` failed to answer lately and has not been heard from since."""
        return time.monotonic() - self._silent.get(node.id, -SILENT_S) < SILENT_S

    def declared(self, node_id: bytes, network_id: str) -> None:
        info = self.book.get(node_id)
        if info is not None and not info.verified:
            info.network_id = network_id[:64]

    def sample(self, network_id: str, exclude: bytes) -> list[list[Any]]:
        """Up to `EXCHANGE_PEERS` verified peers of `network_id` seen lately, newest first."""
        now = time.time()
        chosen = sorted(
            (
                (info.last_seen, node_id, info)
                for node_id, info in self.book.items()
                if node_id != exclude
                and info.verified
                and info.network_id == network_id
                and now - info.last_seen < EXCHANGE_FRESH_S
            ),
            reverse=True,
        )[:EXCHANGE_PEERS]
        return [[info.host, info.port, node_id.hex()] for _, node_id, info in chosen]

    async def probe(self, node: Node) -> bool:
        """Pings `node`; it joins the routing table when it answers with its own id, and leaves
        it (with its latency noted) otherwise."""
        started = time.monotonic()
        answered, node_id = await self.protocol.ping((node.ip, node.port), self.node.id)
        if not answered or node_id != node.id:
            self.protocol.router.remove_contact(node)
            self.went_silent(node)
            return False
        self.protocol.welcome_if_new(node)
        self.touch(node).latency_ms = round((time.monotonic() - started) * 1000, 3)
        return True

    async def hello(self, node: Node) -> bytes | None:
        """The public key of `node` when it proves it holds the key behind its id, else None."""
        nonce = os.urandom(16)
        started = time.monotonic()
        answered, reply = await self.protocol.hello(
            (node.ip, node.port), self.node.id, self.network_id, nonce
        )
        if not answered or not isinstance(reply, list) or len(reply) != 3:
            return None
        public_key, network_id, signature = reply
        if not (
            isinstance(public_key, bytes)
            and isinstance(network_id, str)
            and len(network_id) <= 64
            and isinstance(signature, bytes)
            and len(public_key) == 32
            and peer_id_of(public_key) == peer_id_of_node(node.id)
            and verify(public_key, HELLO_PREFIX + nonce + network_id.encode(), signature)
        ):
            log.warning(
                "peer %s at %s:%d failed to prove its identity", peer_id_of_node(node.id), node.ip, node.port
            )
            return None
        info = self.touch(node)
        info.network_id, info.verified = network_id, True
        info.latency_ms = round((time.monotonic() - started) * 1000, 3)
        return public_key

    async def exchange(self, node: Node) -> list[Node]:
        """The peers of this network that `node` knows."""
        answered, reply = await self.protocol.exchange((node.ip, node.port), self.node.id, self.network_id)
        if not answered or not isinstance(reply, dict):
            return []
        if isinstance(reply.get("network_id"), str):
            self.declared(node.id, reply["network_id"])
        raw = reply.get("peers")
        triples = [
            [bytes.fromhex(item[2]), item[0], item[1]]
            for item in (raw if isinstance(raw, list) else [])[:EXCHANGE_PEERS]
            if isinstance(item, list)
            and len(item) == 3
            and isinstance(item[2], str)
            and len(item[2]) == 40
            and all(character in "0123456789abcdef" for character in item[2])
        ]
        return _nodes(triples, self.node.id)

    async def set_digest(self, dkey: bytes, value: Any) -> bool:
        """Stores a record set here and on the k nodes nearest `dkey` (in chunks, merging)."""
        self.storage[dkey] = value
        key = Node(dkey)
        nearest = self.protocol.router.find_neighbors(key)
        if not nearest:
            return False
        crawl = MergingCrawl(self.protocol, key, nearest, self.ksize, self.alpha)
        await crawl.find()
        results = await asyncio.gather(
            *(self.protocol.call_store(node, dkey, value) for node in crawl.nearest_answered())
        )
        return any(answered for answered, _ in results)

    async def get_records(self, key: str, timeout: float) -> list[PeerRecord]:
        """The valid records of this network under `key`: the local set merged with every set
        found near the key within `timeout` seconds."""
        dkey = digest(key)
        found = [self.storage.records(dkey)]
        nearest = self.protocol.router.find_neighbors(Node(dkey))
        if nearest:
            crawl = MergingCrawl(self.protocol, Node(dkey), nearest, self.ksize, self.alpha)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(crawl.find(), timeout)
            found.extend(crawl.found)
        return merge(found, network_id=self.network_id)
