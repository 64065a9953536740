"""Cross-node prefix-KV sharing on a tiny model: a node fetches a prompt prefix's KV from a
peer that computed it, checked block by block, and generates the tokens of a cold run; a
corrupted, non-finite or wrongly shaped answer is rejected (the node computes the prefix
itself, with the same tokens); a peer that does not share answers not_found."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from swarm import stage as stage_module
from swarm import wire
from swarm.engine import EngineSettings
from swarm.generate import (
    AWAITING_PEERS,
    PREFILLING,
    Generator,
    Prefilling,
    PromptReuse,
    TokenEvent,
    collect,
)
from swarm.identity import Identity
from swarm.loader import open_model
from swarm.prefix_cache import BLOCK_TOKENS, PrefixCache, block_keys
from swarm.prefix_share import BlockLayout, PrefixFetcher, PrefixRejected, answer_query, check_block
from swarm.sampling import SamplingParams
from swarm.stage import StageConfig, StageEngine, StageServer

SETTINGS = EngineSettings(max_context=256)
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPT = [(7 * i + 3) % 200 + 5 for i in range(150)]  # two whole blocks and a tail


@pytest.fixture(scope="module")
def model(tiny_model, data_dir):
    return open_model(str(tiny_model("llama-tiny")), data_dir)


@pytest.fixture(scope="module")
def engine(model):
    return model.engine(SETTINGS)


@pytest.fixture(scope="module")
def cold(model, engine):
    return Generator(engine, model.tokenizer).generate(PROMPT, GREEDY).token_ids


def layout(model, dtype: str = "f16") -> BlockLayout:
    config = model.config
    return BlockLayout(config.n_layers, config.n_kv_heads, config.head_dim, config.value_dim, dtype)


class Peer:
    """A node that served PROMPT, sharing its prefix cache through its stage."""

    def __init__(self, model, engine, share: bool = True):
        self.cache = PrefixCache(64 << 20)
        Generator(engine, model.tokenizer, self.cache).generate(PROMPT, GREEDY)
        stage_engine = StageEngine(engine.config, engine.weights, engine.first, engine.last, engine.settings)
        self.stage = StageServer(
            stage_engine,
            Identity.generate(),
            StageConfig(model_id="tiny"),
            prefix_cache=self.cache if share else None,
        ).start()

    def fetcher(self, model, dtype: str = "f16") -> PrefixFetcher:
        peers = [(self.stage.address, self.stage.identity.public_key)]
        return PrefixFetcher(Identity.generate(), "swarm-local", "tiny", layout(model, dtype), lambda: peers)


@pytest.fixture
def peer(model, engine):
    server = Peer(model, engine)
    yield server
    server.stage.close()


def asking_node(model, engine, fetcher: PrefixFetcher) -> Generator:
    generator = Generator(engine, model.tokenizer, PrefixCache(64 << 20))
    generator.prefix_fetcher = fetcher
    return generator


def test_a_fetched_prefix_gives_the_tokens_of_a_cold_run(model, engine, cold, peer):
    fetcher = peer.fetcher(model)
    node = asking_node(model, engine, fetcher)
    reuse = PromptReuse()
    assert collect(node.stream(PROMPT, GREEDY, reuse=reuse), PROMPT, GREEDY).token_ids == cold
    assert fetcher.stats.fetched_blocks == 3  # both whole blocks and the tail
    assert fetcher.stats.fetched_tokens == len(PROMPT) - 1
    assert fetcher.stats.rejected == 0
    assert reuse.tokens == len(PROMPT) - 1  # reported as cached: this node computed one token
    # What was fetched is now held here: the next run asks nobody.
    assert node.generate(PROMPT, GREEDY).token_ids == cold
    assert fetcher.stats.queries == 1
    assert node.prefix_cache.stats.hits == 1


def test_a_chunked_prompt_says_it_awaits_peers_then_goes_on(model, engine, cold, peer, monkeypatch):
    """With prefill_chunk (a scheduler's turns), the stream yields AWAITING_PEERS while
    the fetch is out (the scheduler runs other requests meanwhile), PREFILLING once the
    blocks are in, then the tokens of a cold run."""
    fetcher = peer.fetcher(model)
    fetch = fetcher.fetch

    def slow(wanted):
        time.sleep(0.3)
        return fetch(wanted)

    monkeypatch.setattr(fetcher, "fetch", slow)
    events = []
    for event in asking_node(model, engine, fetcher).stream(PROMPT, GREEDY, prefill_chunk=64):
        events.append(event)
        if event is AWAITING_PEERS:
            time.sleep(0.001)  # a scheduler with nothing else to run
    markers = [event for event in events if isinstance(event, Prefilling)]
    waits = markers.index(PREFILLING)
    assert waits > 10 and set(markers[:waits]) == {AWAITING_PEERS}
    assert AWAITING_PEERS not in markers[waits:]
    tokens = [event.token_id for event in events if isinstance(event, TokenEvent)]
    assert tokens == cold and fetcher.stats.fetched_blocks == 3


def test_a_corrupted_block_is_rejected_and_the_prefix_computed_here(model, engine, cold, peer, monkeypatch):
    def corrupted(cache, query):
        for index, data in enumerate(answer_query(cache, query)):
            if index == 1:  # flip one byte deep inside the second block's keys
                data = bytearray(data)
                data[len(data) // 3] ^= 0x40
                data = bytes(data)
            yield data

    monkeypatch.setattr(stage_module, "answer_query", corrupted)
    fetcher = peer.fetcher(model)
    node = asking_node(model, engine, fetcher)
    reuse = PromptReuse()
    assert collect(node.stream(PROMPT, GREEDY, reuse=reuse), PROMPT, GREEDY).token_ids == cold
    assert fetcher.stats.rejected == 1 and fetcher.stats.fetched_blocks == 0
    assert reuse.tokens == 0
    assert node.prefix_cache.stats.hits == 0


def test_non_finite_values_are_rejected_even_with_a_matching_digest(model, engine, cold, peer, monkeypatch):
    def poisoned(cache, query):
        for data in answer_query(cache, query):
            message = wire.decode(data)
            keys = message.keys.copy()
            keys[0, 0, 0, 0] = np.nan
            yield wire.encode(wire.PrefixBlock.of(message.remaining, message.key, keys, message.values))

    monkeypatch.setattr(stage_module, "answer_query", poisoned)
    fetcher = peer.fetcher(model)
    assert asking_node(model, engine, fetcher).generate(PROMPT, GREEDY).token_ids == cold
    assert fetcher.stats.rejected == 1 and fetcher.stats.fetched_blocks == 0


def test_values_past_the_cache_types_range_are_rejected():
    """A peer may send f32 values that are finite but too large for an f16 cache: they
    would be stored as infinities (and shared on), so the block is refused."""
    layout = BlockLayout(layers=1, kv_heads=1, key_dim=4, value_dim=4, dtype="f16")
    key = block_keys(PROMPT, 1)[0]
    keys = np.ones((1, 2, 1, 4), np.float32)
    values = keys.copy()
    values[0, 1, 0, 3] = 1e6  # finite in f32, past f16's 65504
    block = wire.PrefixBlock.of(0, key, keys, values)
    with pytest.raises(PrefixRejected, match="not finite"):
        check_block(block, key, 2, layout)
    values[0, 1, 0, 3] = 6e4  # inside f16's range
    stored = check_block(wire.PrefixBlock.of(0, key, keys, values), key, 2, layout)
    assert stored.values.dtype == np.float16 and np.isfinite(stored.values).all()


def test_a_block_of_another_layout_is_rejected(model, engine, peer):
    fetcher = peer.fetcher(model)
    fetcher.layout = dataclasses.replace(fetcher.layout, layers=fetcher.layout.layers + 1)
    assert fetcher.fetch([(0, BLOCK_TOKENS, block_keys(PROMPT, 1)[0])]) == []
    assert fetcher.stats.rejected == 1


def test_a_peer_that_does_not_share_answers_not_found(model, engine, cold):
    peer = Peer(model, engine, share=False)
    try:
        fetcher = peer.fetcher(model)
        assert asking_node(model, engine, fetcher).generate(PROMPT, GREEDY).token_ids == cold
        assert fetcher.stats.queries == 1
        assert fetcher.stats.fetched_blocks == 0 and fetcher.stats.rejected == 0
    finally:
        peer.stage.close()


def test_prefix_messages_round_trip_and_bad_ones_are_refused():
    keys = np.arange(2 * 4 * 3 * 8, dtype=np.float16).reshape(2, 4, 3, 8)
    values = -keys[..., :5]
    block = wire.PrefixBlock.of(3, b"k" * 16, keys, values)
    decoded = wire.decode(wire.encode(block))
    assert decoded.remaining == 3 and decoded.digest == block.digest
    assert np.array_equal(decoded.keys, keys) and np.array_equal(decoded.values, values)
    query = wire.PrefixQuery("tiny", (b"a" * 16, b"b" * 16))
    assert wire.decode(wire.encode(query)) == query
    with pytest.raises(wire.WireError):
        wire.PrefixQuery("tiny", (b"short",))
    with pytest.raises(wire.WireError):
        wire.PrefixQuery("tiny", ())
    truncated = wire.encode(block)[:-10]
    with pytest.raises(wire.WireError):
        wire.decode(truncated)
