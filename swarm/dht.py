"""The DHT process: `python -m swarm.dht --data-dir DIR [--join CODE ...] [--log-level LEVEL]`.

Owns this node's place in the swarm's UDP Kademlia DHT, LAN discovery over mDNS
(`zeroconf`), peer exchange, the peer cache, and the local API on `<data_dir>/dht.sock`
through which the node and the control plane use it (client and socket vocabulary:
`swarm.dht_client`).

Layers, lowest first:
- `swarm.records`: signed records, record sets and how they merge.
- `swarm.dht_network`: Kademlia where a key holds a set of records from many publishers
  (storage, the merging crawl, the `hello` and `exchange` RPCs, the server).
- `DhtService` (here): the process: publishing (sign, store, republish every ttl/3),
  bootstrap (config peers, invite codes, peer cache, mDNS through `LanDiscovery`; again
  every 15 s while there are fewer than 3 contacts, else every 5 min), latency pings,
  and the local API ops.

Records of other networks may pass through this node's storage (the DHT is shared), but
a lookup returns only valid records of this node's `gossip_network_id`.

Offline mode (`pool.offline_mode`): no bootstrap peers, invite codes, peer cache or peer
exchange; mDNS is on and LAN peers are the only ones this node reaches out to.

Never imports jax or numpy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ifaddr
from kademlia.node import Node
from kademlia.utils import digest
from zeroconf import InterfaceChoice, IPVersion, NonUniqueNameException, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from swarm.config import Config, NetworkConfig, load_config
from swarm.dht_client import MAX_LINE_BYTES, NETWORK_OP_SECONDS, SOCKET_NAME, STATE_FILE
from swarm.dht_network import INTRODUCE_INTERVAL_S, MergingCrawl, SwarmServer, is_node_id, peer_id_of_node
from swarm.errors import InvalidRequestError, SwarmError
from swarm.files import atomic_write_text
from swarm.identity import Identity
from swarm.invite import Invite
from swarm.paths import data_dir as default_data_dir
from swarm.peer_cache import CachedPeer, PeerCache
from swarm.records import PeerRecord, RecordError, catalog_key, encode_set, record_key

log = logging.getLogger("swarm.dht")

FEW_CONTACTS = 3
BOOTSTRAP_RETRY_S = 15.0
BOOTSTRAP_INTERVAL_S = 300.0
CACHE_BOOTSTRAP_PEERS = 32
PING_INTERVAL_S = 30.0
FORGET_AFTER_S = 3600.0  # peer info of a peer gone from the routing table this long is dropped
MAX_PUBLISHED = 16
MAX_BOOTSTRAP_ADDRESSES = 64
SERVICE_TYPE = "_swarm._tcp.local."
MDNS_RESOLVE_MS = 3000
PUBLISH_FIELDS = ("model_id", "layers", "n_layers", "address", "throughput", "load")


def parse_address(text: str) -> tuple[str, int]:
    """`(host, port)` of "host:port" (IPv6 hosts in brackets); InvalidRequestError otherwise."""
    host, separator, port = str(text).strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not separator or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidRequestError(f"{text!r} is not a host:port address")
    return host, int(port)


def advertised_host(listen_address: str) -> str:
    """The address others reach this node at: the listen address, or for 0.0.0.0 the first
    non-loopback IPv4 address of this machine (127.0.0.1 when it has none)."""
    if listen_address not in ("", "0.0.0.0"):
        return listen_address
    return next(iter(_lan_addresses()), "127.0.0.1")


def _lan_addresses() -> list[str]:
    return [
        address.ip
        for adapter in ifaddr.get_adapters()
        for address in adapter.ips
        if isinstance(address.ip, str) and not address.ip.startswith("127.")
    ]


@dataclass(frozen=True)
class Target:
    """An address to bootstrap from, how it was found, and who should answer there."""

    host: str
    port: int
    source: str
    peer_id: str | None = None
    public_key: bytes | None = None  # when set, the peer must prove it holds this key


class LanDiscovery:
    """Announces this DHT endpoint over mDNS and bootstraps from same-network services it sees."""

    def __init__(self, service: DhtService) -> None:
        self.service = service
        self.found: dict[str, Target] = {}  # by mDNS service name
        self._zeroconf: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None

    async def start(self) -> None:
        service, listen = self.service, self.service.network.listen_address
        addresses = [listen] if listen not in ("", "0.0.0.0") else (_lan_addresses() or ["127.0.0.1"])
        interfaces = InterfaceChoice.All if listen in ("", "0.0.0.0") else [listen]
        self._zeroconf = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(self._zeroconf.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        port = service.endpoint[1]
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{service.identity.peer_id}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(address) for address in addresses],
            port=port,
            properties={
                "peer_id": service.identity.peer_id,
                "network_id": service.network_id,
                "dht_port": str(port),
            },
        )
        try:
            await (await self._zeroconf.async_register_service(info))
        except NonUniqueNameException:
            log.warning(
                "another node announces peer id %s on the LAN; not announcing", service.identity.peer_id
            )

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            self.found.pop(name, None)
        else:
            self.service.spawn(self._resolve(name))

    async def _resolve(self, name: str) -> None:
        if self._zeroconf is None:
            return
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zeroconf.zeroconf, MDNS_RESOLVE_MS):
            return
        properties = info.decoded_properties
        peer_id, network_id = properties.get("peer_id"), properties.get("network_id")
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if (
            network_id != self.service.network_id
            or not isinstance(peer_id, str)
            or peer_id == self.service.identity.peer_id
            or not addresses
            or not info.port
        ):
            return
        target = Target(addresses[0], info.port, "mdns", peer_id=peer_id)
        self.found[name] = target
        log.info("found %s on the LAN at %s:%d", peer_id, target.host, target.port)
        await self.service.bootstrap([target])

    async def close(self) -> None:
        """Sends goodbyes for this node's service and closes the mDNS sockets."""
        if self._zeroconf is not None:
            await self._zeroconf.async_close()


class DhtService:
    """The DHT process: its server, publications, loops, LAN discovery and local API."""

    def __init__(self, data_dir: Path, config: Config, invites: list[Invite]) -> None:
        self.data_dir = data_dir
        self.network: NetworkConfig = config.network
        self.network_id = config.network.gossip_network_id
        self.offline = config.pool.offline_mode  # LAN peers found by mDNS only
        self.identity = Identity.load_or_create(data_dir)
        self.server = SwarmServer(self.identity, self.network_id)
        self.server.on_contact = lambda node: self.spawn(self._introduce(node))
        self.cache = PeerCache(data_dir)
        self.invites: list[Invite] = []
        for invite in invites:
            try:
                self.check_network(invite)
                self.invites.append(invite)
            except InvalidRequestError as error:
                log.warning("skipping invite: %s", error)
        self.endpoint = ("", 0)  # advertised (host, UDP port)
        self.published: list[dict[str, Any]] = []
        # Records seen in lookups, by publisher and (model, layers): shown by `peers`.
        self.learned: dict[str, dict[tuple[str, tuple[int, int]], PeerRecord]] = {}
        self.mdns: LanDiscovery | None = None
        self.started = time.time()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._published_changed = asyncio.Event()
        self.ops: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "publish": self._op_publish,
            "lookup": self._op_lookup,
            "catalog": self._op_catalog,
            "peers": self._op_peers,
            "status": self._op_status,
            "invite": self._op_invite,
            "bootstrap": self._op_bootstrap,
        }

    def spawn(self, coroutine: Awaitable[Any]) -> asyncio.Task[Any]:
        """Runs `coroutine` in the background, logging (not losing) its failure."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    @property
    def dht_address(self) -> str:
        return f"{self.endpoint[0]}:{self.endpoint[1]}"

    async def run(self, stop: asyncio.Event) -> None:
        """Listens, serves the local API and keeps the node in the DHT until `stop` is set."""
        await self.server.listen(self.network.dht_port, self.network.listen_address)
        port = self.server.transport.get_extra_info("sockname")[1]
        self.endpoint = (advertised_host(self.network.listen_address), port)
        api = await self._serve_api()
        state = {"pid": os.getpid(), "dht": self.dht_address, "peer_id": self.identity.peer_id}
        atomic_write_text(self.data_dir / STATE_FILE, json.dumps(state) + "\n")
        log.info(
            "DHT %s of network %r listening on %s", self.identity.peer_id, self.network_id, self.dht_address
        )
        if self.network.enable_mdns or self.offline:
            self.mdns = LanDiscovery(self)
            self.spawn(self.mdns.start())
        for loop in (self._bootstrap_loop(), self._republish_loop(), self._ping_loop()):
            self.spawn(loop)
        try:
            await stop.wait()
        finally:
            log.info("DHT shutting down")
            for task in list(self._tasks):
                task.cancel()
            if self.mdns is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.mdns.close(), 5)
            api.close()
            self.server.stop()
            (self.data_dir / SOCKET_NAME).unlink(missing_ok=True)
            (self.data_dir / STATE_FILE).unlink(missing_ok=True)

    # Bootstrap and peer exchange

    def _bootstrap_targets(self, cached: list[CachedPeer]) -> list[Target]:
        if self.offline:
            return list(self.mdns.found.values()) if self.mdns is not None else []
        targets = []
        for text in self.network.bootstrap_peers:
            try:
                targets.append(Target(*parse_address(text), "bootstrap"))
            except InvalidRequestError as error:
                log.warning("skipping bootstrap peer: %s", error)
        for invite in self.invites:
            targets.append(Target(invite.host, invite.port, "invite", invite.peer_id, invite.public_key))
        if self.mdns is not None:
            targets.extend(self.mdns.found.values())
        known = {(node.ip, node.port) for node in self.server.contacts()}
        for peer in cached[:CACHE_BOOTSTRAP_PEERS]:
            if (peer.host, peer.port) not in known and peer.peer_id != self.identity.peer_id:
                targets.append(Target(peer.host, peer.port, "cache", peer.peer_id))
        return targets

    async def bootstrap(self, targets: list[Target]) -> int:
        """Contacts `targets`, crawls toward this node's id from those that answer, and returns the
        number of contacts."""
        reached = await asyncio.gather(*(self._reach(target) for target in targets))
        nodes = [node for node in reached if node is not None]
        if nodes:
            server = self.server
            await MergingCrawl(server.protocol, server.node, nodes, server.ksize, server.alpha).find()
        return len(self.server.contacts())

    async def _reach(self, target: Target) -> Node | None:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                target.host, target.port, family=socket.AF_INET, type=socket.SOCK_DGRAM
            )
        except OSError as error:
            log.warning("cannot resolve %s peer %s: %s", target.source, target.host, error)
            return None
        host = str(infos[0][4][0])
        answered, node_id = await self.server.protocol.ping((host, target.port), self.server.node.id)
        if not answered or not is_node_id(node_id) or node_id == self.server.node.id:
            return None
        node = Node(node_id, host, target.port)
        if target.peer_id is not None and peer_id_of_node(node_id) != target.peer_id:
            log.warning(
                "%s peer at %s:%d is %s, not %s as expected; skipped",
                target.source,
                host,
                target.port,
                peer_id_of_node(node_id),
                target.peer_id,
            )
            return None
        if len(self.server.pending_sources) > 1024:
            self.server.pending_sources.clear()
        self.server.pending_sources.setdefault((host, target.port), target.source)
        if target.public_key is not None and await self.server.hello(node) != target.public_key:
            log.warning(
                "%s peer at %s:%d did not prove its identity; skipped", target.source, host, target.port
            )
            return None
        self.server.protocol.welcome_if_new(node)
        return node

    async def _bootstrap_loop(self) -> None:
        while True:
            try:
                cached = await asyncio.to_thread(self.cache.recent, self.network_id)
                contacts = await self.bootstrap(self._bootstrap_targets(cached))
            except Exception:
                log.exception("bootstrap failed")
                contacts = 0
            await asyncio.sleep(BOOTSTRAP_RETRY_S if contacts < FEW_CONTACTS else BOOTSTRAP_INTERVAL_S)

    async def _introduce(self, node: Node) -> None:
        """Verifies a new contact (hello), caches it, and exchanges peers with it."""
        info = self.server.book.get(node.id)
        if info is None or time.monotonic() - info.introduced < INTRODUCE_INTERVAL_S:
            return
        info.introduced = time.monotonic()
        if await self.server.hello(node) is None or info.network_id is None:
            return
        peer = CachedPeer(
            peer_id_of_node(node.id), node.ip, node.port, info.network_id, time.time(), info.source
        )
        await asyncio.to_thread(self.cache.remember_many, [peer])
        if not self.network.peer_exchange or self.offline or info.network_id != self.network_id:
            return
        for learned in await self.server.exchange(node):
            if len(self.server.contacts()) >= self.network.max_peers:
                break
            if self.server.protocol.router.is_new_node(learned):
                self.server.pending_sources.setdefault((learned.ip, learned.port), "exchange")
                self.spawn(self.server.probe(learned))

    async def _ping_loop(self) -> None:
        """Measures every contact's latency (dropping those that do not answer) and refreshes the
        peer cache, every `PING_INTERVAL_S`."""
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            contacts = self.server.contacts()
            answered = await asyncio.gather(*(self.server.probe(node) for node in contacts))
            seen = []
            for node, alive in zip(contacts, answered, strict=True):
                info = self.server.book.get(node.id)
                if alive and info is not None and info.verified and info.network_id is not None:
                    seen.append(
                        CachedPeer(
                            peer_id_of_node(node.id),
                            node.ip,
                            node.port,
                            info.network_id,
                            time.time(),
                            info.source,
                        )
                    )
            await asyncio.to_thread(self.cache.remember_many, seen)
            current = {node.id for node in self.server.contacts()}
            cutoff = time.time() - FORGET_AFTER_S
            for node_id in [
                n for n, info in self.server.book.items() if n not in current and info.last_seen < cutoff
            ]:
                del self.server.book[node_id]
            self._forget_expired()

    # Publishing

    def _sign(self, content: dict[str, Any]) -> PeerRecord:
        return PeerRecord.create(
            self.identity,
            network_id=self.network_id,
            model_id=content["model_id"],
            layers=content["layers"],
            n_layers=content["n_layers"],
            address=content["address"],
            dht=self.dht_address,
            throughput=content["throughput"],
            load=content["load"],
            ttl=self.network.record_ttl_s,
        )

    async def _store_published(self) -> None:
        by_key: dict[str, list[PeerRecord]] = {}
        for content in self.published:
            record = self._sign(content)
            by_key.setdefault(record_key(self.network_id, record.model_id), []).append(record)
            # And in the network's catalog, where nodes learn which models are served at all.
            by_key.setdefault(catalog_key(self.network_id), []).append(record)
        await asyncio.gather(
            *(self.server.set_digest(digest(key), encode_set(records)) for key, records in by_key.items())
        )

    async def _republish_loop(self) -> None:
        """Stores the publications again every ttl/3; a new publication restarts the wait."""
        while True:
            try:
                await asyncio.wait_for(self._published_changed.wait(), self.network.record_ttl_s / 3)
                self._published_changed.clear()
            except TimeoutError:
                try:
                    await self._store_published()
                except Exception:
                    log.exception("republishing failed")

    # Local API

    async def _serve_api(self) -> asyncio.AbstractServer:
        path = self.data_dir / SOCKET_NAME
        path.unlink(missing_ok=True)  # a stale socket of a process that died
        old_umask = os.umask(0o177)  # the socket is created 0600: only this user may talk to it
        try:
            return await asyncio.start_unix_server(
                self._serve_connection, path=str(path), limit=MAX_LINE_BYTES
            )
        finally:
            os.umask(old_umask)

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than the stream limit
                    writer.write(
                        _reply({"ok": False, "error": f"request longer than {MAX_LINE_BYTES} bytes"})
                    )
                    await writer.drain()
                    return
                if not line:
                    return
                writer.write(_reply(await self.answer(line)))
                await writer.drain()
        except ConnectionError:
            return
        finally:
            writer.close()

    async def answer(self, line: bytes) -> dict[str, Any]:
        """The reply to one request line; never raises."""
        try:
            request = json.loads(line)
        except ValueError as error:
            return {"ok": False, "error": f"malformed JSON: {error}"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "a request must be a JSON object"}
        op = self.ops.get(request.get("op"))  # type: ignore[arg-type]
        if op is None:
            known = ", ".join(self.ops)
            return {"ok": False, "error": f"unknown op {request.get('op')!r}; known ops: {known}"}
        try:
            return {"ok": True, **(await op(request))}
        except SwarmError as error:
            return {"ok": False, "error": str(error)}
        except Exception as error:
            log.exception("op %s failed", request.get("op"))
            return {"ok": False, "error": f"internal error: {type(error).__name__}: {error}"}

    async def _op_publish(self, request: dict[str, Any]) -> dict[str, Any]:
        raw = request.get("records")
        if not isinstance(raw, list) or len(raw) > MAX_PUBLISHED:
            raise InvalidRequestError(f"records must be a list of at most {MAX_PUBLISHED} objects")
        contents = []
        for index, item in enumerate(raw):
            if not isinstance(item, dict):
                raise InvalidRequestError(f"records[{index}] must be an object")
            missing = [name for name in PUBLISH_FIELDS if name not in item]
            if missing:
                raise InvalidRequestError(f"records[{index}] lacks {', '.join(missing)}")
            content = {name: item[name] for name in PUBLISH_FIELDS}
            try:
                self._sign(content)
            except RecordError as error:
                raise InvalidRequestError(f"records[{index}]: {error}") from None
            contents.append(content)
        self.published = contents
        self._published_changed.set()
        store = self.spawn(self._store_published())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(store), NETWORK_OP_SECONDS["publish"])
        return {"published": len(contents)}

    async def _op_lookup(self, request: dict[str, Any]) -> dict[str, Any]:
        model_id = request.get("model_id")
        if not isinstance(model_id, str) or not model_id:
            raise InvalidRequestError("lookup needs a model_id")
        return await self._records_at(record_key(self.network_id, model_id), "lookup")

    async def _op_catalog(self, request: dict[str, Any]) -> dict[str, Any]:
        """The records in the network's catalog: which peers serve which models (a sample of
        the newest in a large network; `lookup` has all of one model's)."""
        return await self._records_at(catalog_key(self.network_id), "catalog")

    async def _records_at(self, key: str, op: str) -> dict[str, Any]:
        """The answer to `op`: the records found under `key`, which `peers` then shows too."""
        records = await self.server.get_records(key, NETWORK_OP_SECONDS[op] - 0.5)
        for record in records:
            self.learned.setdefault(record.peer_id, {})[(record.model_id, record.layers)] = record
        return {"records": [record.to_dict() for record in records]}

    def _forget_expired(self) -> None:
        now = time.time()
        for peer_id in list(self.learned):
            current = {slot: record for slot, record in self.learned[peer_id].items() if record.expires > now}
            if current:
                self.learned[peer_id] = current
            else:
                del self.learned[peer_id]

    async def _op_peers(self, request: dict[str, Any]) -> dict[str, Any]:
        self._forget_expired()
        peers = []
        for node in self.server.contacts():
            peer_id = peer_id_of_node(node.id)
            info = self.server.book.get(node.id)
            peers.append(
                {
                    "peer_id": peer_id,
                    "dht": f"{node.ip}:{node.port}",
                    "latency_ms": info.latency_ms if info else None,
                    "last_seen": info.last_seen if info else None,
                    "source": info.source if info else "contact",
                    "network_id": info.network_id if info else None,
                    "verified": bool(info and info.verified),
                    "records": [
                        {
                            "model_id": record.model_id,
                            "layers": list(record.layers),
                            "address": record.address,
                        }
                        for record in self.learned.get(peer_id, {}).values()
                    ],
                }
            )
        return {"peers": peers}

    async def _op_status(self, request: dict[str, Any]) -> dict[str, Any]:
        return {
            "peer_id": self.identity.peer_id,
            "network_id": self.network_id,
            "dht": self.dht_address,
            "contacts": len(self.server.contacts()),
            "published": self.published,
            "mdns": self.mdns is not None,
            "uptime_s": round(time.time() - self.started, 1),
        }

    async def _op_invite(self, request: dict[str, Any]) -> dict[str, Any]:
        host, port = self.endpoint
        return {"code": Invite(host, port, self.identity.public_key, self.network_id).encode()}

    async def _op_bootstrap(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.offline:
            raise InvalidRequestError(
                "offline mode: this node joins only peers it finds on the local network (mDNS)"
            )
        targets = []
        addresses, code = request.get("addresses"), request.get("code")
        if addresses is not None:
            if not isinstance(addresses, list) or len(addresses) > MAX_BOOTSTRAP_ADDRESSES:
                raise InvalidRequestError(
                    f"addresses must be a list of at most {MAX_BOOTSTRAP_ADDRESSES} host:port"
                )
            targets += [Target(*parse_address(address), "bootstrap") for address in addresses]
        if code is not None:
            invite = Invite.parse(code)
            self.check_network(invite)
            targets.append(Target(invite.host, invite.port, "invite", invite.peer_id, invite.public_key))
        if not targets:
            raise InvalidRequestError("bootstrap needs addresses or an invite code")
        joining = self.spawn(self.bootstrap(targets))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(joining), NETWORK_OP_SECONDS["bootstrap"])
        return {"contacts": len(self.server.contacts())}

    def check_network(self, invite: Invite) -> None:
        if invite.network_id != self.network_id:
            raise InvalidRequestError(
                f"the invite is for network {invite.network_id!r} but this node is on {self.network_id!r} "
                "(set network.gossip_network_id)"
            )


def _reply(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


async def serve(data_dir: Path, config: Config, invites: list[Invite]) -> None:
    """Runs the DHT process until SIGTERM or SIGINT. SIGHUP (the supervisor's config
    reload) does not stop it: its settings (ports, bootstrap, mDNS) apply at a restart."""
    service = DhtService(data_dir, config, invites)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: log.info("config reloaded: DHT settings apply at restart"))
    await service.run(stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swarm.dht", description="Run the swarm DHT process.")
    parser.add_argument("--data-dir", help="data dir (default: $SWARM_NODE_DATA_DIR or the platform default)")
    parser.add_argument(
        "--join", action="append", default=[], metavar="CODE", help="invite code to join through"
    )
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="default: logging.level"
    )
    args = parser.parse_args(argv)
    try:
        data_dir = default_data_dir(os.environ, args.data_dir)
        config = load_config(data_dir, os.environ)
        invites = [Invite.parse(code) for code in args.join]
    except SwarmError as error:
        print(f"swarm dht: {error}", file=sys.stderr)
        return 2
    level = getattr(logging, (args.log_level or config.logging.level).upper())
    logging.basicConfig(
        stream=sys.stderr, level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Kademlia logs every message at info and rpcudp every timeout at error: routine for a DHT.
    for name in ("kademlia", "rpcudp"):
        logging.getLogger(name).setLevel(level if level <= logging.DEBUG else logging.CRITICAL)
    try:
        asyncio.run(serve(data_dir, config, invites))
    except SwarmError as error:
        print(f"swarm dht: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
