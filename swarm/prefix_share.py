"""Cross-node prefix-KV sharing: fetching a prompt prefix's KV from a peer that computed it.

Off by default (`network.prefix_sharing`): a node that shares answers its peers' queries
from its prefix cache, which tells them the KV of prompts it served and of the replies
it generated (a block is asked for
by the chained hash of its tokens, so only a peer that already holds the same tokens can
name it, but KV can be inverted into text). Nodes of one network that opt in gain: a
system prompt or document one of them prefilled is fetched by the others instead of
being computed again.

Owns `PrefixFetcher` (the asking side: a query over the encrypted transport to peers
holding the whole model, each answer checked block by block: the key asked for, the
digest, the layout of this node's cache and finite values; one bad block rejects that
peer's whole answer) and `answer_query` (the serving side, for `swarm.stage`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from swarm import wire
from swarm.identity import Identity
from swarm.prefix_cache import Block, PrefixCache
from swarm.secure_channel import ChannelError, SecureChannel

log = logging.getLogger(__name__)

MAX_PEERS_ASKED = 2  # whole-model peers asked per prompt, nearest first
_pool: ThreadPoolExecutor | None = None


class PrefixRejected(Exception):
    """A peer's answer failed a check; nothing of it is used."""


@dataclass(frozen=True)
class BlockLayout:
    """What a block must look like to go into this node's cache."""

    layers: int
    kv_heads: int
    key_dim: int
    value_dim: int
    dtype: str  # "f16" or "f32"


@dataclass
class FetchStats:
    queries: int = 0
    fetched_blocks: int = 0
    fetched_tokens: int = 0
    rejected: int = 0  # answers refused by a check
    failed: int = 0  # peers that could not be reached or answered wrongly

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def answer_query(cache: PrefixCache, query: wire.PrefixQuery) -> Iterator[bytes]:
    """The encoded answer to `query` from `cache`: its leading run of held blocks."""
    held = cache.held(query.keys)
    if not held:
        yield wire.encode(wire.Error("", wire.NOT_FOUND, "none of these prefix blocks is held here"))
        return
    for index, (key, block) in enumerate(held):
        yield wire.encode(wire.PrefixBlock.of(len(held) - index - 1, key, block.keys, block.values))


def check_block(message: wire.PrefixBlock, key: bytes, tokens: int, layout: BlockLayout) -> Block:
    """The block in `message` if it is the one asked for and intact; raises PrefixRejected."""
    if message.key != key:
        raise PrefixRejected("the peer answered with a block that was not asked for")
    if wire.prefix_digest(message.key, message.keys, message.values) != message.digest:
        raise PrefixRejected("a block's digest does not match its contents")
    expected_keys = (layout.layers, tokens, layout.kv_heads, layout.key_dim)
    expected_values = (layout.layers, tokens, layout.kv_heads, layout.value_dim)
    if message.keys.shape != expected_keys or message.values.shape != expected_values:
        raise PrefixRejected(
            f"a block has shape {message.keys.shape}/{message.values.shape}, this model needs"
            f" {expected_keys}/{expected_values}"
        )
    # Checked in this cache's type: f32 values past f16's range become infinities there.
    dtype = np.float16 if layout.dtype == "f16" else np.float32
    with np.errstate(over="ignore"):
        keys, values = message.keys.astype(dtype, copy=False), message.values.astype(dtype, copy=False)
    if not (np.isfinite(keys).all() and np.isfinite(values).all()):
        raise PrefixRejected("a block holds values that are not finite in this node's cache")
    return Block(keys, values)


class PrefixFetcher:
    """Fetches prefix blocks from peers: `peers()` gives (address, public key) of peers
    holding this model whole, nearest first."""

    def __init__(
        self,
        identity: Identity,
        network_id: str,
        model_id: str,
        layout: BlockLayout,
        peers: Callable[[], Sequence[tuple[str, bytes]]],
        timeout: float = 5.0,
    ):
        self.identity = identity
        self.network_id = network_id
        self.model_id = model_id
        self.layout = layout
        self.peers = peers
        self.timeout = timeout
        self.stats = FetchStats()

    def fetch(self, wanted: Sequence[tuple[int, int, bytes]]) -> list[Block]:
        """Blocks for a leading run of `wanted` (start, stop, key) pieces, from the first
        peer that holds any; [] when none does or every answer fails its checks."""
        if not wanted:
            return []
        self.stats.queries += 1
        try:
            peers = list(self.peers())[:MAX_PEERS_ASKED]
        except Exception as error:  # the DHT being down only means no fetch
            log.info("no peers to fetch prompt prefixes from: %s", error)
            return []
        for address, public_key in peers:
            try:
                blocks = self._ask(address, public_key, wanted)
            except PrefixRejected as error:
                self.stats.rejected += 1
                log.warning("rejected prefix blocks from %s: %s", address, error)
                continue
            except (ChannelError, wire.WireError, OSError) as error:
                self.stats.failed += 1
                log.info("prefix fetch from %s failed: %s", address, error)
                continue
            if blocks:
                self.stats.fetched_blocks += len(blocks)
                self.stats.fetched_tokens += sum(block.keys.shape[1] for block in blocks)
                return blocks
        return []

    def fetch_async(self, wanted: Sequence[tuple[int, int, bytes]]) -> Future:
        """`fetch` on a worker thread (the caller keeps serving meanwhile)."""
        global _pool
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prefix-fetch")
        return _pool.submit(self.fetch, list(wanted))

    def _ask(self, address: str, public_key: bytes, wanted: Sequence[tuple[int, int, bytes]]) -> list[Block]:
        channel = SecureChannel.connect(
            address,
            self.identity,
            self.network_id,
            expected_peer=public_key,
            timeout=self.timeout,
        )
        blocks: list[Block] = []
        try:
            keys = tuple(key for _, _, key in wanted[: wire.MAX_PREFIX_KEYS])
            channel.send(wire.encode(wire.PrefixQuery(self.model_id, keys)), timeout=self.timeout)
            while True:
                message = wire.decode(channel.recv(timeout=self.timeout))
                if isinstance(message, wire.Error):
                    if message.code == wire.NOT_FOUND and not blocks:
                        return []
                    raise wire.WireError(f"the peer answered {message.code}: {message.message}")
                if not isinstance(message, wire.PrefixBlock) or len(blocks) >= len(keys):
                    raise PrefixRejected(f"the peer answered with {type(message).__name__}")
                start, stop, key = wanted[len(blocks)]
                blocks.append(check_block(message, key, stop - start, self.layout))
                if message.remaining == 0:
                    return blocks
        finally:
            channel.close()
