"""Prefix cache: the KV of prompt prefixes, kept in hashed blocks of 64 tokens and reused.

Owns `PrefixCache`. A prompt is cut into blocks of BLOCK_TOKENS; block i's key is a hash
chained over every token up to its end (BLAKE2b of the previous key and its token ids),
so a key names one exact prefix. After a prefill the node stores the blocks it does not
hold yet (host copies of the cache rows of this engine's layers), and the prompt's tail:
the rows after its last usable whole block up to (not including) its last token. A later
prompt with the same prefix copies those rows into its fresh cache and prefills only the
rest; the same prompt resubmitted prefills one token. At least one prompt token is always
left to prefill: its logits give the first new token.

Blocks are evicted least recently used first to stay within the memory budget. Thread-safe.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BLOCK_TOKENS = 64

# Cache rows from the host, as loaded into a session's cache: one array f[layers, n, ...],
# or consecutive pieces of them (a hit's blocks, which the engine joins as it pads them).
Rows = np.ndarray | Sequence[np.ndarray]


@dataclass(frozen=True)
class Block:
    keys: np.ndarray  # [layers, tokens, n_kv_heads, head_dim], the cache's dtype
    values: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


@dataclass
class PrefixStats:
    hits: int = 0  # lookups that reused at least one block
    misses: int = 0
    reused_tokens: int = 0
    stored_blocks: int = 0
    evicted_blocks: int = 0


def _chain(previous: bytes, tokens: Sequence[int], tag: bytes = b"") -> bytes:
    data = np.asarray(tokens, np.uint32).astype("<u4").tobytes()
    return hashlib.blake2b(previous + tag + data, digest_size=16).digest()


def block_keys(prompt_ids: Sequence[int], count: int) -> list[bytes]:
    """The chained keys of the first `count` whole blocks of `prompt_ids`."""
    keys: list[bytes] = []
    previous = b""
    for index in range(count):
        previous = _chain(previous, prompt_ids[index * BLOCK_TOKENS : (index + 1) * BLOCK_TOKENS])
        keys.append(previous)
    return keys


def segments(prompt_ids: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """(start, stop, key) of every storable piece of a prompt's KV, in order: its whole
    blocks, then the tail (the rest but the last token) when there is one."""
    whole = len(prompt_ids) // BLOCK_TOKENS
    keys = block_keys(prompt_ids, whole)
    pieces = [(i * BLOCK_TOKENS, (i + 1) * BLOCK_TOKENS, key) for i, key in enumerate(keys)]
    usable = (len(prompt_ids) - 1) // BLOCK_TOKENS
    start, stop = usable * BLOCK_TOKENS, len(prompt_ids) - 1
    if start < stop:
        previous = keys[usable - 1] if usable else b""
        pieces.append((start, stop, _chain(previous, prompt_ids[start:stop], b"tail")))
    return pieces


class PrefixCache:
    """Blocks of prefix KV by chained hash, LRU within `budget_bytes`."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.stats = PrefixStats()
        self._blocks: OrderedDict[bytes, Block] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup(self, prompt_ids: Sequence[int]) -> list[Block]:
        """The cached pieces of the longest stored prefix, in order, leaving at least one
        token to prefill."""
        limit = len(prompt_ids) - 1
        found: list[Block] = []
        with self._lock:
            for start, stop, key in segments(prompt_ids):
                if stop > limit:
                    continue  # the whole block holding the last token; the tail covers it
                block = self._blocks.get(key)
                if block is None or start != sum(b.keys.shape[1] for b in found):
                    break
                self._blocks.move_to_end(key)
                found.append(block)
            if found:
                self.stats.hits += 1
                self.stats.reused_tokens += sum(block.keys.shape[1] for block in found)
            else:
                self.stats.misses += 1
        return found

    def cached_tokens(self, prompt_ids: Sequence[int]) -> int:
        """How many leading tokens of `prompt_ids` a `lookup` would take from the cache now
        (what a scheduler need not count as prompt work); no stats, no recency."""
        limit = len(prompt_ids) - 1
        count = 0
        with self._lock:
            for start, stop, key in segments(prompt_ids):
                if stop > limit:
                    continue
                block = self._blocks.get(key)
                if block is None or start != count:
                    break
                count += block.keys.shape[1]
        return count

    def held(self, keys: Sequence[bytes]) -> list[tuple[bytes, Block]]:
        """The blocks of the leading run of `keys` held here (for a peer's query); no stats."""
        found = []
        with self._lock:
            for key in keys:
                block = self._blocks.get(key)
                if block is None:
                    break
                self._blocks.move_to_end(key)
                found.append((key, block))
        return found

    def missing(self, prompt_ids: Sequence[int]) -> list[tuple[int, int, bytes]]:
        """(start, stop, key) of the pieces of a prefilled prompt not stored yet."""
        with self._lock:
            return [piece for piece in segments(prompt_ids) if piece[2] not in self._blocks]

    def store(self, key: bytes, block: Block) -> None:
        if block.nbytes > self.budget_bytes:
            return
        with self._lock:
            if key in self._blocks:
                self._blocks.move_to_end(key)
                return
            self._blocks[key] = block
            self._bytes += block.nbytes
            self.stats.stored_blocks += 1
            while self._bytes > self.budget_bytes:
                _, evicted = self._blocks.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.stats.evicted_blocks += 1
