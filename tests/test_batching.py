"""Continuous batching: sessions of a shared cache decode together.

With a stand-in engine whose output depends on every token a cache row holds (so a
lost, stale or misplaced row changes the answer): steps queued together run in one
call; sessions join and leave between steps; a leaving session's queued step never
runs; threads batch by group commit; the scheduler advances every decoding request one
token per step (fairness) and frees the row of a cancelled one. With the real models:
batched decoding gives the same greedy tokens as decoding alone.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from swarm.batching import SlotBatch
from swarm.errors import InvalidRequestError
from swarm.generate import CHUNK_QUEUED, Generator, Prefilling
from swarm.node_server import Job, Scheduler
from swarm.sampling import SamplingParams

VOCAB = 101


def answer(tokens) -> np.ndarray:
    """The stand-in model: logits peaking at (sum of the tokens so far * 7) mod VOCAB."""
    tokens = np.asarray(tokens)
    if (tokens < 0).any():
        raise AssertionError("read a position nobody wrote")
    logits = np.zeros(VOCAB, np.float32)
    logits[int(tokens.sum() * 7 + len(tokens)) % VOCAB] = 10.0
    return logits


def expected_tokens(prompt: list[int], count: int) -> list[int]:
    tokens = list(prompt)
    out = []
    for _ in range(count):
        out.append(int(np.argmax(answer(tokens))))
        tokens.append(out[-1])
    return out


class StandInEngine:
    """The engine interface of SlotBatch and Generator over a cache of token ids."""

    is_first = True
    is_last = True

    def __init__(self, max_context: int = 4096, step_seconds: float = 0.0):
        self.config = SimpleNamespace(vocab_size=VOCAB)
        self.max_context = max_context
        self.step_seconds = step_seconds
        self.steps: list[list[int]] = []  # the slots of each step call
        self.prepared: list[tuple[int, int]] = []  # step shapes compiled ahead
        self.prompt_calls: list[list[int]] = []  # the rows of each call of prompt chunks
        self.fail_next = False

    def cache_capacity(self, needed: int) -> int:
        return max(needed, 16)

    def new_cache(self, capacity: int, batch: int = 1) -> np.ndarray:
        return np.full((batch, capacity), -1, np.int64)

    def forward(self, inputs, start, cache, *, slot=None):
        row = 0 if slot is None else slot
        inputs = np.asarray(inputs)
        cache[row, start : start + len(inputs)] = inputs
        self.prompt_calls.append([row])
        return answer(cache[row, : start + len(inputs)]), cache

    def chunk_steps(self, count):  # buckets of 4, 8, 16; longer chunks take several calls
        bucket = 4
        while bucket < count:
            bucket *= 2
        return bucket if bucket <= 16 else None

    def forward_rows(self, pieces, starts, first, cache):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device lost")
        assert len({self.chunk_steps(len(piece)) for piece in pieces}) == 1, "one bucket per call"
        outputs = []
        for row, (piece, start) in enumerate(zip(pieces, starts, strict=True), start=first):
            cache[row, start : start + len(piece)] = piece
            outputs.append(answer(cache[row, : start + len(piece)]))
        self.prompt_calls.append(list(range(first, first + len(pieces))))
        return np.stack(outputs), cache

    def takes_token_ids(self, inputs):
        return np.issubdtype(np.asarray(inputs).dtype, np.integer)

    def step(self, inputs, positions, slots, cache):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device lost")
        assert len(set(slots.tolist())) == len(slots), "one step per row"
        time.sleep(self.step_seconds)
        self.steps.append(sorted(slots.tolist()))
        outputs = []
        for token, position, slot in zip(inputs, positions, slots, strict=True):
            cache[slot, position] = token
            cache[slot, position + 1 :] = -1  # anything past the step is not yet written
            outputs.append(answer(cache[slot, : position + 1]))
        return np.stack(outputs), cache

    def step_shape(self, count, position, capacity, total):
        return count, position // 256

    def prepare_step(self, count, position, cache):
        self.prepared.append(self.step_shape(count, position, cache.shape[1], cache.shape[0]))
        return True

    def prepare_prefill(self, steps, cache, rows=1, end=None):
        self.prepared.append(("prefill", steps) if rows == 1 else ("prompts", rows, steps))
        return True

    def prompt_shape(self, rows, steps, end, capacity):
        return rows, steps, end // 256  # like step_shape: a further bound, another call

    def with_rows(self, cache, keys, values, slot=0):
        keys = keys if isinstance(keys, np.ndarray) else np.concatenate(keys, axis=1)  # a hit's blocks
        cache[slot, : keys.shape[1]] = keys[0]
        return cache

    def cache_rows(self, cache, start, stop, slot=0):
        rows = cache[slot, start:stop][None].copy()
        return rows, rows.copy()


def prefilled(batch: SlotBatch, prompt: list[int]) -> tuple[int, np.ndarray]:
    slot = batch.acquire(len(prompt) + 32)
    assert slot is not None
    return slot, batch.prefill(slot, np.asarray(prompt), 0)


def test_steps_queued_together_run_in_one_call_and_each_gets_its_own_answer():
    engine = StandInEngine()
    batch = SlotBatch(engine, slots=4, max_capacity=1024)
    prompts = [[3, 4], [9, 9, 9], [1]]
    seated = [prefilled(batch, prompt) for prompt in prompts]
    tickets = [
        batch.submit(slot, int(np.argmax(logits)), len(prompt))
        for (slot, logits), prompt in zip(seated, prompts, strict=True)
    ]
    outputs = [ticket.result() for ticket in tickets]
    assert engine.steps == [sorted(slot for slot, _ in seated)]
    for prompt, output in zip(prompts, outputs, strict=True):
        assert int(np.argmax(output)) == expected_tokens(prompt, 2)[1]
    assert batch.stats.as_dict() == {
        "steps": 1,
        "rows": 3,
        "mean_rows": 3.0,
        "widest": 3,
        "prompt_calls": 0,
        "prompt_chunks": 0,
    }


def seated(batch: SlotBatch, count: int) -> list[int]:
    slots = [batch.acquire(64) for _ in range(count)]
    assert None not in slots
    return slots


def test_prompt_chunks_queued_together_run_in_one_call_once_its_shape_is_compiled():
    engine = StandInEngine()
    batch = SlotBatch(engine, slots=8, max_capacity=1024)
    prompts = [[3, 4, 5], [9, 9], [1, 2, 3, 4], [7]]  # one bucket (4 tokens) each
    slots = seated(batch, 4)

    def run_all() -> list[np.ndarray]:
        tickets = [
            batch.submit_prompt(slot, np.asarray(p), 0) for slot, p in zip(slots, prompts, strict=True)
        ]
        return [ticket.result() for ticket in tickets]

    outputs = run_all()  # the 4-row call is not compiled yet: one by one, and it compiles
    assert engine.prompt_calls == [[0], [1], [2], [3]]
    batch.stop_preparing()  # after the compile under way: the only one asked for
    assert ("prompts", 4, 4) in engine.prepared
    engine.prompt_calls.clear()
    assert [int(np.argmax(o)) for o in run_all()] == [int(np.argmax(o)) for o in outputs]
    assert engine.prompt_calls == [[0, 1, 2, 3]]
    for prompt, output in zip(prompts, outputs, strict=True):
        assert int(np.argmax(output)) == expected_tokens(prompt, 1)[0]
    assert batch.stats.prompt_calls == 5 and batch.stats.prompt_chunks == 8


def test_warm_up_compiles_the_calls_of_prompts_going_in_together():
    engine = StandInEngine()
    batch = SlotBatch(engine, slots=8, max_capacity=1024)
    # A round of up to 32 prompt tokens: 2, 4 or 8 chunks of 4, 2 or 4 of 8, 2 of 16.
    groups = batch.prompt_call_shapes([4, 8, 16, 32], budget=32)
    assert groups == [(2, 4), (4, 4), (8, 4), (2, 8), (4, 8), (2, 16)]
    batch.warm_up([4, 8, 16, 32], groups)
    deadline = time.monotonic() + 10
    while not all(batch.prompts_ready(*g) for g in groups) and time.monotonic() < deadline:
        time.sleep(0.01)  # compiled in the background
    assert [item for item in engine.prepared if item[0] == "prompts"] == [("prompts", *g) for g in groups]
    slots = seated(batch, 2)
    tickets = [batch.submit_prompt(slot, np.asarray([slot + 1] * 3), 0) for slot in slots]
    assert [int(np.argmax(t.result())) for t in tickets] == [
        expected_tokens([1] * 3, 1)[0],
        expected_tokens([2] * 3, 1)[0],
    ]
    assert engine.prompt_calls == [[0, 1]]  # together from the first, no compile awaited


def test_prompt_chunks_share_a_call_only_in_consecutive_rows_of_one_bucket():
    engine = StandInEngine()
    batch = SlotBatch(engine, slots=8, max_capacity=1024)
    for rows in (2, 4):
        batch.prepare_prompts(rows, 4)
        batch.prepare_prompts(rows, 8)
    slots = seated(batch, 8)
    batch.release(slots[3])  # rows 0-2 and 4-7 hold sessions
    chunks = {0: [1], 1: [2, 2], 2: [3], 4: [4] * 5, 5: [5] * 6, 6: [6], 7: [7] * 8}
    tickets = {slot: batch.submit_prompt(slot, np.asarray(chunk), 0) for slot, chunk in chunks.items()}
    for slot, ticket in tickets.items():
        assert int(np.argmax(ticket.result())) == expected_tokens(chunks[slot], 1)[0]
    # 0-2 (bucket 4): two rows together, then one; 4-5 (bucket 8) together; 6 (bucket 4)
    # alone; 7 (bucket 8) alone.
    assert engine.prompt_calls == [[0, 1], [2], [4, 5], [6], [7]]


def test_a_failing_call_of_prompt_chunks_fails_only_its_own_sessions():
    engine = StandInEngine()
    batch = SlotBatch(engine, slots=4, max_capacity=1024)
    batch.prepare_prompts(2, 4)
    slots = seated(batch, 3)
    tickets = [batch.submit_prompt(slot, np.asarray([slot + 1, 2]), 0) for slot in slots]
    engine.fail_next = True
    for ticket in tickets[:2]:  # rows 0 and 1 went in one call, which failed
        with pytest.raises(RuntimeError, match="device lost"):
            ticket.result()
    assert int(np.argmax(tickets[2].result())) == expected_tokens([3, 2], 1)[0]
    again = [batch.submit_prompt(slot, np.asarray([slot + 1, 2]), 0) for slot in slots[:2]]
    assert [int(np.argmax(t.result())) for t in again] == [
        expected_tokens([s + 1, 2], 1)[0] for s in slots[:2]
    ]
    assert batch.stats.prompt_calls == 2  # the failed call is not counted


def test_settle_waits_for_the_compiles_asked_for():
    engine = StandInEngine()
    batch = SlotBatch(engine, slots=8, max_capacity=1024)
    batch.warm_up([4, 8], batch.prompt_call_shapes([4, 8], budget=16))
    assert batch.settle(timeout=10)
    assert all(batch.prompts_ready(rows, steps) for rows, steps in [(2, 4), (4, 4), (2, 8)])


def test_a_leaving_session_s_queued_prompt_chunk_never_runs():
    engine = StandInEngine()
    batch = SlotBatch(engine, slots=2, max_capacity=1024)
    batch.prepare_prompts(2, 4)
    first, second = seated(batch, 2)
    stay = batch.submit_prompt(first, np.asarray([1, 2]), 0)
    leave = batch.submit_prompt(second, np.asarray([5, 5]), 0)
    batch.release(second)
    with pytest.raises(InvalidRequestError, match="left the batch"):
        leave.result()
    assert int(np.argmax(stay.result())) == expected_tokens([1, 2], 1)[0]
    assert engine.prompt_calls == [[first]]
    with pytest.raises(InvalidRequestError, match="not held"):
        batch.submit_prompt(second, np.asarray([1]), 0)
    with pytest.raises(InvalidRequestError, match="empty input"):
        batch.submit_prompt(first, np.asarray([], np.int32), 0)
    twice = batch.submit_prompt(first, np.asarray([3]), 2)
    with pytest.raises(InvalidRequestError, match="already has a prompt chunk queued"):
        batch.submit_prompt(first, np.asarray([4]), 3)
    assert int(np.argmax(twice.result())) == expected_tokens([1, 2, 3], 1)[0]  # the first stands


def test_a_leaving_session_s_queued_step_never_runs_and_its_row_is_reused():
    engine = StandInEngine()
    batch = SlotBatch(engine, slots=2, max_capacity=1024)
    slot, _ = prefilled(batch, [5, 6, 7])
    ticket = batch.submit(slot, 50, 3)
    batch.release(slot)
    batch.flush()
    assert engine.steps == []
    with pytest.raises(InvalidRequestError):
        ticket.result()
    again, logits = prefilled(batch, [8])
    assert again == slot  # the freed row goes to the next session, clean
    assert int(np.argmax(batch.run(again, int(np.argmax(logits)), 1))) == expected_tokens([8], 2)[1]


def test_rows_run_out_and_too_long_sessions_are_turned_away():
    batch = SlotBatch(StandInEngine(), slots=2, max_capacity=512)
    assert batch.acquire(513) is None
    first, second = batch.acquire(100), batch.acquire(100)
    assert {first, second} == {0, 1}
    assert batch.acquire(10) is None
    batch.release(first)
    assert batch.acquire(10) == first
    with pytest.raises(InvalidRequestError):
        SlotBatch(StandInEngine(), slots=0, max_capacity=512)


def test_the_shared_cache_is_allocated_once_when_the_first_session_joins():
    engine = StandInEngine()
    batch = SlotBatch(engine, slots=3, max_capacity=2048)
    assert batch.capacity == 0
    slot, logits = prefilled(batch, list(range(1, 200)))
    assert batch.capacity == 2048
    other = batch.acquire(1500)
    batch.prefill(other, np.asarray([4, 4]), 0)
    token = int(np.argmax(logits))
    assert int(np.argmax(batch.run(slot, token, 199))) == expected_tokens(list(range(1, 200)), 2)[1]


def test_the_steps_sessions_will_need_next_are_compiled_ahead_in_the_background():
    engine = StandInEngine()  # its step shapes: (sessions, position // 256)
    batch = SlotBatch(engine, slots=4, max_capacity=1024)
    batch.warm_up([16, 32])
    assert engine.prepared[0] == (1, 0)  # the lone session's step, before returning
    slot, logits = prefilled(batch, list(range(1, 180)))
    token = int(np.argmax(logits))
    for position in range(179, 200):
        token = int(np.argmax(batch.run(slot, token, position)))
    deadline = time.monotonic() + 5
    # Widths at start, the prompt chunk sizes, and the next bound coming up.
    wanted = {(1, 0), (2, 0), (4, 0), ("prefill", 16), ("prefill", 32), (1, 1)}
    while not wanted <= set(engine.prepared) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert wanted <= set(engine.prepared)
    assert len(engine.prepared) == len(set(engine.prepared))  # each shape once


def test_a_failing_step_fails_every_session_in_it():
    engine = StandInEngine()
    batch = SlotBatch(engine, slots=2, max_capacity=1024)
    tickets = [batch.submit(prefilled(batch, [i + 1])[0], 1, 1) for i in range(2)]
    engine.fail_next = True
    for ticket in tickets:
        with pytest.raises(RuntimeError, match="device lost"):
            ticket.result()


def test_threads_stepping_at_once_share_calls_by_group_commit():
    engine = StandInEngine(step_seconds=0.02)
    batch = SlotBatch(engine, slots=4, max_capacity=1024)
    prompts = [[i + 2, i + 3] for i in range(4)]
    seated = [prefilled(batch, prompt) for prompt in prompts]
    produced: dict[int, list[int]] = {}

    def session(index: int) -> None:
        slot, logits = seated[index]
        tokens = [int(np.argmax(logits))]
        for position in range(len(prompts[index]), len(prompts[index]) + 10):
            tokens.append(int(np.argmax(batch.run(slot, tokens[-1], position))))
        produced[index] = tokens

    threads = [threading.Thread(target=session, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for index, prompt in enumerate(prompts):
        assert produced[index] == expected_tokens(prompt, 11)
    assert batch.stats.rows == 40
    assert batch.stats.steps < 40 and batch.stats.widest > 1


# --- the scheduler over generations sharing a batch ------------------------------------------


class DigitTokenizer:
    """Token t's text is its number and a space; nothing ends a generation."""

    vocab_size = VOCAB
    eog_ids = frozenset()

    def stream_decoder(self):
        return SimpleNamespace(push=lambda token: f"{token} ", flush=lambda: "")

    def token_bytes(self, token: int, skip_special: bool = False) -> bytes:
        return f"{token} ".encode()


def events(generator: Generator, prompt: list[int], count: int):
    """Node-protocol events of a generation, as swarm.node gives the scheduler."""
    for event in generator.stream(prompt, SamplingParams(temperature=0, max_tokens=count)):
        if isinstance(event, str):
            yield {"event": "done", "finish_reason": event}
            return
        yield {"event": "text", "text": event.text, "token_id": event.token_id}


def tokens_of(job: Job, timeout: float = 10.0) -> list[int]:
    out = []
    while True:
        event = job.output.get(timeout=timeout)
        if event["event"] == "done":
            return out
        if event["event"] != "progress":  # a prompt chunk queued or in
            out.append(event["token_id"])


def batched_generator(slots: int = 4) -> tuple[StandInEngine, SlotBatch, Generator]:
    engine = StandInEngine(step_seconds=0.005)
    batch = SlotBatch(engine, slots=slots, max_capacity=1024)
    return engine, batch, Generator(engine, DigitTokenizer(), batch=batch)


def chunked_events(generator: Generator, prompt: list[int], count: int, chunk: int):
    """Node-protocol events of a generation whose prompt goes in `chunk` tokens a turn."""
    params = SamplingParams(temperature=0, max_tokens=count)
    for event in generator.stream(prompt, params, prefill_chunk=chunk):
        if isinstance(event, Prefilling):
            yield event.as_event()
        elif isinstance(event, str):
            yield {"event": "done", "finish_reason": event}
            return
        else:
            yield {"event": "text", "text": event.text, "token_id": event.token_id}


def test_scheduled_prompts_arriving_together_go_in_as_one_call():
    engine, batch, generator = batched_generator()
    batch.prepare_prompts(2, 4)
    scheduler = Scheduler(max_active=4, max_waiting=8, prompt_budget=8)
    gate = threading.Event()

    def blocker():
        gate.wait(10)
        yield {"event": "done", "finish_reason": "length"}

    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [3]]
    try:
        scheduler.submit(Job(blocker()))  # holds the scheduler while the four arrive
        jobs = [Job(chunked_events(generator, prompt, 5, 8), prompt_left=len(prompt)) for prompt in prompts]
        for job in jobs:
            scheduler.submit(job)
        time.sleep(0.1)
        gate.set()
        results = [tokens_of(job) for job in jobs]
    finally:
        scheduler.stop()
    assert results == [expected_tokens(prompt, 5) for prompt in prompts]
    # Rounds of up to 8 prompt tokens: the first takes 3 + 2 tokens, then the 1-token
    # prompt that still fits (rows 0, 1 and 2: a call of two rows, then one); the
    # 4-token prompt waits for the next round (row 3). The first three decode together.
    assert engine.prompt_calls == [[0, 1], [2], [3]]
    assert engine.steps[0] == [0, 1, 2]


def test_scheduled_requests_decode_together_one_token_each_per_step():
    engine, batch, generator = batched_generator()
    scheduler = Scheduler(max_active=4, max_waiting=8)
    prompts = [[1, 2], [3], [4, 5, 6], [7]]
    try:
        jobs = [Job(events(generator, prompt, 12)) for prompt in prompts]
        for job in jobs:
            scheduler.submit(job)
        results = [tokens_of(job) for job in jobs]
    finally:
        scheduler.stop()
    for prompt, tokens in zip(prompts, results, strict=True):
        assert tokens == expected_tokens(prompt, 12)
    # Fair: no request ever has two steps in one call; together: most calls carry all four.
    assert sum(len(step) for step in engine.steps) == 4 * 11
    assert max(len(step) for step in engine.steps) == 4
    assert sum(len(step) == 4 for step in engine.steps) >= 8
    assert batch.in_use() == 0


def test_requests_join_and_leave_between_steps():
    engine, batch, generator = batched_generator()
    scheduler = Scheduler(max_active=4, max_waiting=8)
    try:
        long = Job(events(generator, [1], 40))
        scheduler.submit(long)
        while len(engine.steps) < 5:
            time.sleep(0.005)
        short = Job(events(generator, [2], 4))  # joins a running batch
        scheduler.submit(short)
        assert tokens_of(short) == expected_tokens([2], 4)
        assert tokens_of(long) == expected_tokens([1], 40)
    finally:
        scheduler.stop()
    widths = [len(step) for step in engine.steps]
    first_pair = widths.index(2)
    assert widths[:first_pair] == [1] * first_pair  # alone until the other joined
    assert widths[first_pair : first_pair + 3] == [2, 2, 2]  # together for its 3 steps
    assert set(widths[first_pair + 3 :]) == {1}  # alone again once it left
    assert batch.in_use() == 0


def test_a_cancelled_request_leaves_the_batch_at_once():
    engine, batch, generator = batched_generator()
    scheduler = Scheduler(max_active=4, max_waiting=8)
    try:
        keep = Job(events(generator, [3], 30))
        cancel = Job(events(generator, [4], 1000))
        scheduler.submit(keep)
        scheduler.submit(cancel)
        for _ in range(3):
            assert cancel.output.get(timeout=10)["event"] == "text"
        cancel.cancelled.set()
        assert tokens_of(keep) == expected_tokens([3], 30)
    finally:
        scheduler.stop()
    assert batch.in_use() == 0
    assert engine.steps[-1] == [0]  # the survivor (row 0) finished alone
    assert scheduler.stats.cancelled == 1


def test_requests_beyond_the_batch_decode_with_a_cache_of_their_own():
    engine, batch, generator = batched_generator(slots=1)
    scheduler = Scheduler(max_active=3, max_waiting=8)
    prompts = [[1], [2], [3]]
    try:
        jobs = [Job(events(generator, prompt, 6)) for prompt in prompts]
        for job in jobs:
            scheduler.submit(job)
        results = [tokens_of(job) for job in jobs]
    finally:
        scheduler.stop()
    assert results == [expected_tokens(prompt, 6) for prompt in prompts]
    assert max(len(step) for step in engine.steps) == 1  # only the row's holder used the batch
    assert batch.in_use() == 0


# --- real models ---------------------------------------------------------------------


def in_turn(streams: list, live: set[int], got: list[list[int]], each_turn=None) -> None:
    """Advances the `live` streams one event each per turn, in row order, until all end,
    adding their tokens to `got`; `each_turn(turn)` first, if given (it may add streams)."""
    turn = 0
    while live:
        turn += 1
        if each_turn is not None:
            each_turn(turn)
        for index in sorted(live):
            event = next(streams[index])
            if isinstance(event, str):
                live.discard(index)
            elif event.token_id >= 0:
                got[index].append(event.token_id)


@pytest.mark.realmodel
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_batched_decoding_gives_the_greedy_tokens_of_decoding_alone(name, opened_models):
    """With the default engine (packed weights and the CPU kernels where they build):
    every row of a step is computed by the same arithmetic whatever shares the step
    (the kernels work row by row, norms sum rows by fixed halving), so the tokens are
    equal exactly, not just until a near tie."""
    model = opened_models(name)
    engine = model.engine()
    tokenizer = model.tokenizer
    texts = [
        "The capital of France is",
        "Once upon a time, in a small village by the sea, there lived",
        "def fibonacci(n):",
        "Three colours of the rainbow are",
        "Water boils at",
    ]
    prompts = [tokenizer.encode(text, add_bos=None, parse_special=False) for text in texts]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = Generator(engine, tokenizer)
    expected = [alone.generate(prompt, params).token_ids for prompt in prompts]

    batch = SlotBatch(engine, slots=8, max_capacity=512)
    together = Generator(engine, tokenizer, batch=batch)
    streams = [together.stream(prompt, params) for prompt in prompts[:3]]
    got: list[list[int]] = [[] for _ in prompts]
    live = {0, 1, 2}

    def join(turn: int) -> None:
        if turn == 4:  # two requests join a batch already decoding
            streams.extend(together.stream(prompt, params) for prompt in prompts[3:])
            live.update({3, 4})

    in_turn(streams, live, got, join)
    assert got == expected
    assert batch.stats.widest == 5 and batch.in_use() == 0


@pytest.mark.realmodel
def test_a_rows_logits_do_not_depend_on_what_shares_its_step(opened_models):
    """Bit for bit: five rows stepped together give each row's logits stepped alone."""
    engine = opened_models("smollm2-135m").engine()
    rng = np.random.default_rng(0)
    cache = engine.new_cache(256, 8)
    lengths = [7, 20, 33, 12, 50]
    for slot, length in enumerate(lengths):
        _, cache = engine.forward(rng.integers(0, 1000, length).astype(np.int32), 0, cache, slot=slot)
    tokens = rng.integers(0, 1000, 5).astype(np.int32)
    positions = np.asarray(lengths, np.int32)
    keys, values = np.asarray(cache.keys), np.asarray(cache.values)
    together, _ = engine.step(tokens, positions, np.arange(5, dtype=np.int32), cache)
    for row in range(5):
        fresh = type(cache)(jnp.asarray(keys), jnp.asarray(values))
        alone, _ = engine.step(
            tokens[row : row + 1], positions[row : row + 1], np.asarray([row], np.int32), fresh
        )
        np.testing.assert_array_equal(alone[0], together[row])
    # Rows are returned in the order asked for, whatever the slots' order.
    order = np.asarray([3, 0, 4, 2, 1])
    fresh = type(cache)(jnp.asarray(keys), jnp.asarray(values))
    shuffled, _ = engine.step(tokens[order], positions[order], order.astype(np.int32), fresh)
    np.testing.assert_array_equal(shuffled, together[order])


@pytest.mark.realmodel
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_prompts_going_in_together_give_the_tokens_and_cache_of_prompts_alone(name, opened_models):
    """Four prompts queued in one round run as one call of four rows; each row's logits,
    keys and values are those of its prompt run alone, bit for bit (every row is
    computed by the same arithmetic), so the greedy tokens are equal."""
    model = opened_models(name)
    engine = model.engine()
    tokenizer = model.tokenizer
    texts = [
        "The capital of France is a city that many people visit because",
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
        "Water boils at one hundred degrees at sea level, but on a mountain",
        "Three colours of the rainbow are red, green and blue, and the others",
    ]
    encoded = [tokenizer.encode(text, add_bos=None, parse_special=False) for text in texts]
    length = min(len(ids) for ids in encoded)
    prompts = [ids[:length] for ids in encoded]  # one length, so one bucket
    lengths = [length, length - 1, length, length - 2]  # and padding that differs per row
    prompts = [ids[:n] for ids, n in zip(prompts, lengths, strict=True)]
    buckets = {engine.chunk_steps(len(prompt)) for prompt in prompts}
    assert len(buckets) == 1 and None not in buckets
    cache = engine.new_cache(256, 2)
    long = np.asarray(prompts[0] * 8, np.int32)[:100]  # another bucket
    with pytest.raises(InvalidRequestError, match="same prompt bucket"):
        engine.forward_rows([np.asarray(prompts[0], np.int32), long], [0, 0], 0, cache)
    with pytest.raises(InvalidRequestError, match="one start per piece"):
        engine.forward_rows([np.asarray(prompts[0], np.int32)] * 2, [0], 0, cache)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = Generator(engine, tokenizer)
    expected = [alone.generate(prompt, params).token_ids for prompt in prompts]

    batch = SlotBatch(engine, slots=4, max_capacity=256)
    batch.prepare_prompts(4, buckets.pop())
    together = Generator(engine, tokenizer, batch=batch)
    streams = [together.stream(prompt, params, prefill_chunk=64) for prompt in prompts]
    assert all(next(stream) is CHUNK_QUEUED for stream in streams)  # each queued its prompt
    single = engine.new_cache(256)
    _, single = engine.forward(np.asarray(prompts[1], np.int32), 0, single)
    got: list[list[int]] = [[] for _ in prompts]
    first = [next(stream) for stream in streams]  # the first runs all four chunks
    assert batch.stats.prompt_calls == 1 and batch.stats.prompt_chunks == 4
    keys, values = batch.rows(1, 0, lengths[1])
    np.testing.assert_array_equal(keys, np.asarray(single.keys[:, 0, : lengths[1]]))
    np.testing.assert_array_equal(values, np.asarray(single.values[:, 0, : lengths[1]]))
    for index, event in enumerate(first):
        got[index].append(event.token_id)
    in_turn(streams, set(range(len(prompts))), got)
    assert got == expected
    assert batch.in_use() == 0
