"""The prefix cache (hashed 64-token blocks of prompt KV, reused across requests) and chunked prefill."""

from __future__ import annotations

import numpy as np
import pytest

from swarm.prefix_cache import BLOCK_TOKENS, Block, PrefixCache, block_keys
from swarm.sampling import SamplingParams


def block(fill: float = 0.0) -> Block:
    rows = np.full((2, BLOCK_TOKENS, 1, 4), fill, np.float16)
    return Block(rows, rows.copy())


def test_keys_name_whole_prefixes():
    a = list(range(200))
    b = [*range(64), *range(1000, 1136)]
    assert block_keys(a, 3)[0] == block_keys(b, 3)[0]  # same first block
    assert block_keys(a, 3)[1] != block_keys(b, 3)[1]  # a different second block changes it
    c = [*range(64, 128), *range(64)]
    assert block_keys(c, 2)[1] != block_keys(a, 2)[1]  # a block's key depends on what precedes it


def fill(cache: PrefixCache, prompt: list[int]) -> None:
    for start, stop, key in cache.missing(prompt):
        rows = np.full((2, stop - start, 1, 4), start, np.float16)
        cache.store(key, Block(rows, rows.copy()))


def test_lookup_leaves_a_token_to_prefill_and_stops_at_the_first_gap():
    cache = PrefixCache(1 << 20)
    prompt = list(range(150))
    fill(cache, prompt)  # blocks 0-64 and 64-128, and the tail 128-149
    assert len(cache) == 3
    found = cache.lookup(prompt)  # resubmitted: everything but the last token
    assert [b.keys.shape[1] for b in found] == [64, 64, 21]
    assert [int(b.keys[0, 0, 0, 0]) for b in found] == [0, 64, 128]
    assert [b.keys.shape[1] for b in cache.lookup([*prompt[:140], 9, 9])] == [64, 64]  # tail differs
    assert cache.lookup([7, *prompt]) == []
    assert cache.stats.hits == 2 and cache.stats.misses == 1
    assert cache.stats.reused_tokens == 149 + 128


def test_cached_tokens_counts_what_a_lookup_would_reuse_without_touching_stats():
    cache = PrefixCache(1 << 20)
    prompt = list(range(150))
    fill(cache, prompt)
    for asked in (prompt, [*prompt[:140], 9, 9], [7, *prompt], list(range(128))):
        before = (cache.stats.hits, cache.stats.misses, cache.stats.reused_tokens)
        counted = cache.cached_tokens(asked)
        assert (cache.stats.hits, cache.stats.misses, cache.stats.reused_tokens) == before
        assert counted == sum(b.keys.shape[1] for b in cache.lookup(asked))


def test_a_prompt_ending_on_a_block_edge_reuses_all_but_its_last_token():
    cache = PrefixCache(1 << 20)
    prompt = list(range(128))
    fill(cache, prompt)
    assert [b.keys.shape[1] for b in cache.lookup(prompt)] == [64, 63]
    assert [b.keys.shape[1] for b in cache.lookup([*prompt, 1])] == [64, 64]


def test_least_recently_used_blocks_go_first_within_the_budget():
    one = block().nbytes
    cache = PrefixCache(2 * one)
    prompts = [[i] * (BLOCK_TOKENS + 1) for i in range(3)]
    for prompt in prompts[:2]:
        fill(cache, prompt)
    assert cache.lookup(prompts[0])  # touch the first: the second is now the oldest
    fill(cache, prompts[2])
    assert cache.nbytes <= 2 * one and len(cache) == 2
    assert cache.lookup(prompts[0]) and cache.lookup(prompts[2]) and not cache.lookup(prompts[1])
    assert cache.stats.evicted_blocks == 1


@pytest.mark.realmodel
@pytest.mark.parametrize("batched", [False, True])
def test_a_prefix_hit_gives_the_tokens_of_a_cold_run(opened_models, real_engines, batched):
    from swarm.batching import SlotBatch
    from swarm.generate import Generator, PromptReuse, collect

    model = opened_models("smollm2-135m")
    engine = real_engines("smollm2-135m")
    text = " ".join(f"Item {i} is a small blue box with a red lid." for i in range(25))
    shared = model.tokenizer.encode(text, add_bos=None, parse_special=False)
    assert len(shared) > 4 * BLOCK_TOKENS
    first = [*shared, *model.tokenizer.encode(" The last item is", add_bos=None, parse_special=False)]
    second = [
        *shared,
        *model.tokenizer.encode(" The colour of the lid is", add_bos=None, parse_special=False),
    ]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    cold = Generator(engine, model.tokenizer)
    batch = SlotBatch(engine, 2, 1024) if batched else None  # the prefix lands in a shared row
    cached = Generator(engine, model.tokenizer, PrefixCache(256 << 20), batch)
    reused = []
    for prompt in (first, first, second):
        reuse = PromptReuse()
        hit = collect(cached.stream(prompt, params, reuse=reuse), prompt, params)
        assert hit.token_ids == cold.generate(prompt, params).token_ids
        reused.append(reuse.tokens)
    stats = cached.prefix_cache.stats
    assert stats.misses == 1 and stats.hits == 2
    assert stats.reused_tokens >= 2 * (len(shared) // BLOCK_TOKENS) * BLOCK_TOKENS
    # What each request is told it reused (its cached prompt tokens): nothing cold, all but
    # the last token resubmitted, and the whole blocks the second prompt shares.
    common = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert reused == [0, len(first) - 1, common // BLOCK_TOKENS * BLOCK_TOKENS]
    assert sum(reused) == stats.reused_tokens


def together(generator, prompts, params) -> list[list[int]]:
    """Each prompt's generated token ids, their streams advanced in turn (as a node's
    scheduler does), so their decode steps share calls."""
    from swarm.generate import TokenEvent

    streams = [generator.stream(prompt, params) for prompt in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    running = set(range(len(prompts)))
    while running:
        for index in sorted(running):
            event = next(streams[index], None)
            if event is None:
                running.discard(index)
            elif isinstance(event, TokenEvent) and event.token_id >= 0:
                tokens[index].append(event.token_id)
    return tokens


@pytest.mark.realmodel
@pytest.mark.parametrize("batched", [False, True])
def test_a_follow_up_reuses_the_reply_and_gives_the_tokens_of_a_cold_run(
    opened_models, real_engines, batched
):
    """A chat's next turn repeats the last exchange: the blocks its reply filled were kept
    too, so the turn computes only what follows them, and the keys and values the decode
    steps wrote give the tokens a cold prefill of the whole turn gives."""
    from swarm.batching import SlotBatch
    from swarm.generate import Generator, PromptReuse, collect

    model = opened_models("smollm2-135m")
    engine = real_engines("smollm2-135m")
    tokenizer = model.tokenizer
    question = tokenizer.encode(
        " ".join(f"Note {i}: the {i}th shelf holds jars of jam." for i in range(6))
        + " Describe the shelves.",
        add_bos=None,
        parse_special=False,
    )
    params = SamplingParams(temperature=0.0, max_tokens=90, ignore_eos=True)
    cold = Generator(engine, tokenizer)
    batch = SlotBatch(engine, 2, 1024) if batched else None
    cached = Generator(engine, tokenizer, PrefixCache(256 << 20), batch)
    if batched:
        # Beside another session: the reply's keys and values come from two-row steps.
        other = [*question[:-4], *tokenizer.encode(" Count the jars.", add_bos=None, parse_special=False)]
        reply, _ = together(cached, [question, other], params)
        assert batch.stats.widest == 2
    else:
        reply = cached.generate(question, params).token_ids
    assert len(reply) == 90
    follow_up = [
        *question,
        *reply,
        *tokenizer.encode(" Which shelf is last?", add_bos=None, parse_special=False),
    ]
    reuse = PromptReuse()
    short = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    warm = collect(cached.stream(follow_up, short, reuse=reuse), follow_up, short)
    assert warm.token_ids == cold.generate(follow_up, short).token_ids
    # The decode steps wrote every position but the last reply token's (never run).
    ran = len(question) + len(reply) - 1
    assert ran // BLOCK_TOKENS > len(question) // BLOCK_TOKENS  # the reply filled blocks
    assert reuse.tokens == ran // BLOCK_TOKENS * BLOCK_TOKENS
    # Bit for bit what a prefill of the whole turn stores.
    prefilled = Generator(engine, tokenizer, PrefixCache(256 << 20))
    prefilled.generate(follow_up, short)
    keys = block_keys(follow_up, ran // BLOCK_TOKENS)
    kept, reference = cached.prefix_cache.held(keys), prefilled.prefix_cache.held(keys)
    assert len(kept) == len(reference) == len(keys)
    for (_, block), (_, expected) in zip(kept, reference, strict=True):
        np.testing.assert_array_equal(block.keys, expected.keys)
        np.testing.assert_array_equal(block.values, expected.values)


@pytest.mark.realmodel
def test_chunked_prefill_yields_between_chunks_and_gives_the_same_tokens(opened_models, real_engines):
    from swarm.generate import CHUNK_QUEUED, PREFILLING, Generator

    model = opened_models("smollm2-135m")
    generator = Generator(real_engines("smollm2-135m"), model.tokenizer)
    text = " ".join(f"Step {i}: stir the pot and add a pinch of salt." for i in range(20))
    prompt = model.tokenizer.encode(text, add_bos=None, parse_special=False)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    events = list(generator.stream(prompt, params, prefill_chunk=64))
    chunks = -(len(prompt) // -64)
    # Each chunk is queued, then runs on the next turn; PREFILLING between chunks.
    assert events[: 2 * chunks - 1] == [CHUNK_QUEUED, PREFILLING] * (chunks - 1) + [CHUNK_QUEUED]
    markers = (CHUNK_QUEUED, PREFILLING)
    tokens = [event.token_id for event in events if event not in markers and not isinstance(event, str)]
    assert tokens == generator.generate(prompt, params).token_ids
