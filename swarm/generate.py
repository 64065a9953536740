"""The token loop: prefill, decode, sample, detokenize, stop.

Owns generation over a whole-model `Engine`: context-window checks, the stop rules
(end-of-generation tokens, stop strings, max tokens), per-token log-probabilities,
and streaming text that never splits a UTF-8 character or leaks part of a stop string.
"""

from __future__ import annotations

import logging
from collections.abc import Generator as GeneratorType
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from swarm.batching import SlotBatch, Ticket
from swarm.engine import Engine
from swarm.errors import ContextOverflowError, InvalidRequestError
from swarm.model import KVCache
from swarm.prefix_cache import BLOCK_TOKENS, Block, PrefixCache, Rows, segments
from swarm.sampling import Sampler, SamplingParams, largest, token_logprobs
from swarm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from swarm.prefix_share import PrefixFetcher

log = logging.getLogger(__name__)

# How many of the most likely tokens a constrained step inspects, and how many
# acceptable ones it keeps to sample from.
CONSTRAINT_SCAN = 4096
CONSTRAINT_KEEP = 64


class Constraint(Protocol):
    """Limits generated text to a language (see swarm.tool_calls)."""

    def accepts(self, piece: str) -> bool: ...

    def advance(self, piece: str) -> None: ...

    @property
    def complete(self) -> bool: ...


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. `text` is what became printable with it (may be empty)."""

    token_id: int
    text: str
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    logprob: float | None = None


class FinishReason(str):
    """Why a generation ended ("stop" or "length"); names the stop string that ended it."""

    stop_sequence: str | None = None

    @classmethod
    def stopped_by(cls, stop: str | None) -> FinishReason:
        reason = cls("stop")
        reason.stop_sequence = stop
        return reason


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass
class PromptReuse:
    """How many of a stream's prompt tokens came from the prefix cache (this node's, or
    blocks fetched from peers) rather than being computed: set by `Generator.stream` once
    those blocks are loaded, before the rest of the prompt goes in. APIs report it as
    cached prompt tokens."""

    tokens: int = 0


class StopScanner:
    """Holds back text that could still become a stop string; finds the first stop."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.pending = ""
        self.stopped = False
        self.matched: str | None = None

    def push(self, text: str) -> str:
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            index, self.matched = min(hits)
            out, self.pending, self.stopped = self.pending[:index], "", True
            return out
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:size]):
                    hold = max(hold, size)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Prefilling:
    """Yielded by `Generator.stream` while the prompt goes in, when asked to
    (`prefill_chunk`): CHUNK_QUEUED when a chunk is queued (the next turn runs it, with
    every chunk queued by then: a scheduler gives each arriving prompt's turn first,
    then their next turns, and their chunks go in together), PREFILLING after a chunk
    went in and more of the prompt is left, AWAITING_PEERS while prefix blocks are
    awaited from peers (`waiting`: that turn did no device work)."""

    def __init__(self, name: str, waiting: bool = False, queued: bool = False) -> None:
        self.name = name
        self.waiting = waiting
        self.queued = queued

    def __repr__(self) -> str:
        return self.name

    def as_event(self) -> dict[str, Any]:
        """The node protocol's event for this marker (`swarm.node_server.Backend.run`)."""
        flags = {"waiting": True} if self.waiting else {"queued": True} if self.queued else {}
        return {"event": "progress", "prompt": True, **flags}


PREFILLING = Prefilling("PREFILLING")
CHUNK_QUEUED = Prefilling("CHUNK_QUEUED", queued=True)
AWAITING_PEERS = Prefilling("AWAITING_PEERS", waiting=True)


def check_prompt(engine: Engine, prompt_ids: Sequence[int], max_tokens: int) -> int:
    """How many tokens may follow `prompt_ids` in `engine`'s context; raises if it does not fit."""
    limit = engine.max_context
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty")
    vocab = engine.config.vocab_size
    if any(not 0 <= t < vocab for t in prompt_ids):
        raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
    if len(prompt_ids) >= limit:
        raise ContextOverflowError(
            f"prompt is too long: {len(prompt_ids)} tokens, the context window is {limit} tokens"
        )
    return min(max_tokens, limit - len(prompt_ids))


class _Step:
    """A decode step of a session with its own cache, run when its result is asked for."""

    def __init__(self, seat: _OwnCache, token: np.ndarray, position: int):
        self.seat, self.token, self.position = seat, token, position

    def result(self) -> np.ndarray:
        return self.seat.prefill(np.asarray([self.token], np.int32), self.position)


class _Chunk:
    """A prompt chunk of a session with its own cache, run when its result is asked for."""

    def __init__(self, seat: _OwnCache, ids: np.ndarray, start: int):
        self.seat, self.ids, self.start = seat, ids, start

    def result(self) -> np.ndarray:
        return self.seat.prefill(self.ids, self.start)


class _OwnCache:
    """A session's keys and values in a cache of its own."""

    def __init__(self, engine: Engine, capacity: int):
        self.engine = engine
        self.cache: KVCache | None = engine.new_cache(capacity)

    def prefill(self, ids: np.ndarray, start: int) -> np.ndarray:
        out, self.cache = self.engine.forward(ids, start, self.cache)
        return out

    def load_rows(self, keys: Rows, values: Rows) -> None:
        self.cache = self.engine.with_rows(self.cache, keys, values)

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return self.engine.cache_rows(self.cache, start, stop)

    def submit(self, token: np.ndarray, position: int) -> _Step:
        return _Step(self, token, position)

    def submit_prompt(self, ids: np.ndarray, start: int) -> _Chunk:
        return _Chunk(self, ids, start)

    def close(self) -> None:
        self.cache = None


class _BatchSeat:
    """A session's keys and values in a row of a shared SlotBatch."""

    def __init__(self, batch: SlotBatch, slot: int):
        self.batch = batch
        self.slot: int | None = slot

    def prefill(self, ids: np.ndarray, start: int) -> np.ndarray:
        return self.batch.prefill(self.slot, ids, start)

    def load_rows(self, keys: Rows, values: Rows) -> None:
        self.batch.load_rows(self.slot, keys, values)

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return self.batch.rows(self.slot, start, stop)

    def submit(self, token: np.ndarray, position: int) -> Ticket:
        return self.batch.submit(self.slot, token, position)

    def submit_prompt(self, ids: np.ndarray, start: int) -> Ticket:
        return self.batch.submit_prompt(self.slot, ids, start)

    def close(self) -> None:
        if self.slot is not None:
            self.batch.release(self.slot)
            self.slot = None


_Seat = _OwnCache | _BatchSeat


class Generator:
    """Generates from a whole-model engine (layers [0, L)) with its tokenizer."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        prefix_cache: PrefixCache | None = None,
        batch: SlotBatch | None = None,
    ):
        if not (engine.is_first and engine.is_last):
            raise InvalidRequestError("generation needs an engine holding every layer")
        self.engine = engine
        self.tokenizer = tokenizer
        self.prefix_cache = prefix_cache
        self.batch = batch  # a shared cache whose sessions decode together
        # Asks peers for prefix blocks this node lacks (network.prefix_sharing); None: never.
        self.prefix_fetcher: PrefixFetcher | None = None
        self._piece_texts: list[str] | None = None

    def check_prompt(self, prompt_ids: Sequence[int], max_tokens: int) -> int:
        """How many tokens may be generated; raises if the prompt does not fit."""
        return check_prompt(self.engine, prompt_ids, max_tokens)

    def _constrain(self, logits: np.ndarray, constraint: Constraint) -> np.ndarray | None:
        """The tokens the constraint accepts, most likely first; None if none is.

        Scans the most likely tokens first and stops after CONSTRAINT_KEEP acceptable
        ones: a valid continuation is almost always among the first few, and the
        sampler would never pick the far tail anyway.
        """
        scan = min(CONSTRAINT_SCAN, logits.shape[0])
        order = largest(logits, scan)
        pieces = self.token_pieces()
        allowed = self._accepted(order, pieces, constraint)
        if not allowed and scan < logits.shape[0]:
            # A narrow schema can leave its only valid token far down the ranking
            # (a key's last letter): then look through the whole vocabulary.
            rest = np.setdiff1d(np.arange(logits.shape[0]), order, assume_unique=True)
            allowed = self._accepted(rest[np.argsort(-logits[rest], kind="stable")], pieces, constraint)
        return np.asarray(allowed, np.int64) if allowed else None

    @staticmethod
    def _accepted(order: np.ndarray, pieces: list[str], constraint: Constraint) -> list[int]:
        """Up to CONSTRAINT_KEEP tokens of `order` whose text the constraint accepts."""
        allowed: list[int] = []
        for token in order:
            piece = pieces[token]
            if piece and constraint.accepts(piece):
                allowed.append(int(token))
                if len(allowed) >= CONSTRAINT_KEEP:
                    break
        return allowed

    def token_pieces(self) -> list[str]:
        """Each token's text on its own (special tokens empty), for constraints."""
        if self._piece_texts is None:
            tokenizer = self.tokenizer
            self._piece_texts = [
                tokenizer.token_bytes(t, skip_special=True).decode("utf-8", errors="replace")
                for t in range(tokenizer.vocab_size)
            ]
        return self._piece_texts

    def _seat(self, positions: int) -> _Seat:
        """Where a session's keys and values live: a row of the shared batch when one is
        free and large enough, else a cache of its own."""
        if self.batch is not None:
            slot = self.batch.acquire(positions)
            if slot is not None:
                return _BatchSeat(self.batch, slot)
        return _OwnCache(self.engine, self.engine.cache_capacity(positions))

    def _prefill(
        self, seat: _Seat, prompt_ids: Sequence[int], chunk: int | None, reuse: PromptReuse | None = None
    ) -> GeneratorType[Prefilling, None, np.ndarray]:
        """The prompt's last logits, its keys and values in `seat`, reusing and feeding the
        prefix cache.

        With `chunk`, the prompt goes through in pieces of that many tokens: each is
        queued and CHUNK_QUEUED yielded, then it runs when the generator resumes (with
        the other sessions' chunks queued meanwhile: one call where their rows allow),
        and PREFILLING is yielded between pieces (a scheduler's chance to run other
        sessions' steps).
        """
        prefix = self.prefix_cache
        position = 0
        if prefix is not None:
            blocks = prefix.lookup(prompt_ids)
            if self.prefix_fetcher is not None:
                blocks += yield from self._fetch(prompt_ids, len(blocks), chunk is not None)
            if blocks:
                # The blocks go as they are: the engine joins them in the copy that pads them.
                seat.load_rows([block.keys for block in blocks], [block.values for block in blocks])
                position = sum(block.keys.shape[1] for block in blocks)
        if reuse is not None:
            reuse.tokens = position
        step = chunk or len(prompt_ids)
        while True:
            piece = np.asarray(prompt_ids[position : position + step], np.int32)
            if chunk is None:
                logits = seat.prefill(piece, position)
            else:
                pending = seat.submit_prompt(piece, position)
                yield CHUNK_QUEUED
                logits = pending.result()
            position += len(piece)
            if position >= len(prompt_ids):
                break
            yield PREFILLING
        if prefix is not None:
            for first, stop, key in prefix.missing(prompt_ids):
                prefix.store(key, Block(*seat.rows(first, stop)))
        return logits

    def _fetch(
        self, prompt_ids: Sequence[int], held: int, yielding: bool
    ) -> GeneratorType[Prefilling, None, list[Block]]:
        """Blocks after the first `held` fetched from peers and stored here, when at least a
        whole block is missing. When `yielding`, yields AWAITING_PEERS while the answer is
        not in (without blocking: a scheduler runs the other requests meanwhile, and
        paces the polls), then PREFILLING once: what is left of the prompt is device
        work again."""
        assert self.prefix_fetcher is not None and self.prefix_cache is not None
        usable = [piece for piece in segments(prompt_ids) if piece[1] <= len(prompt_ids) - 1]
        wanted = usable[held:]
        if sum(stop - start for start, stop, _ in wanted) < BLOCK_TOKENS:
            return []  # computing a few tokens beats a round trip
        future = self.prefix_fetcher.fetch_async(wanted)
        if yielding and not future.done():
            while not future.done():
                yield AWAITING_PEERS  # the caller paces its polls (the scheduler does)
            yield PREFILLING
        try:
            blocks = future.result()
        except Exception:  # a failed fetch only means computing the prefix here
            log.exception("fetching prompt prefixes from peers failed")
            return []
        for (_, _, key), block in zip(wanted, blocks, strict=False):
            self.prefix_cache.store(key, block)
        return blocks

    def stream(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        constraint: Constraint | None = None,
        *,
        prefill_chunk: int | None = None,
        reuse: PromptReuse | None = None,
    ) -> Iterator[TokenEvent | str | Prefilling]:
        """Yields a TokenEvent per generated token, then the finish reason as a str.

        With a `constraint`, only tokens it accepts are sampled, end-of-generation
        tokens are refused until it is complete, and generation stops when it is.
        With `prefill_chunk`, a long prompt is prefilled that many tokens at a time:
        CHUNK_QUEUED is yielded as each chunk is queued (it runs when the stream
        resumes, so with a shared batch, prompts advanced in turn go in together),
        PREFILLING between the chunks, AWAITING_PEERS while a prefix is fetched
        (callers passing it must skip those `Prefilling` markers).
        Each decode step is queued before its token is yielded and computed when the
        stream resumes, so with a shared batch, sessions advanced in turn step together.
        `reuse`, when given, learns how many prompt tokens the prefix cache supplied.
        """
        budget = self.check_prompt(prompt_ids, params.max_tokens)
        seat = self._seat(len(prompt_ids) + budget)
        try:
            for event in self._decode(seat, prompt_ids, params, constraint, budget, prefill_chunk, reuse):
                if isinstance(event, str):  # the finish reason, always last: leave the batch now
                    seat.close()
                yield event
        finally:
            seat.close()

    def _decode(
        self,
        seat: _Seat,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        constraint: Constraint | None,
        budget: int,
        prefill_chunk: int | None,
        reuse: PromptReuse | None = None,
    ) -> Iterator[TokenEvent | str | Prefilling]:
        logits = yield from self._prefill(seat, prompt_ids, prefill_chunk, reuse)
        sampler = Sampler(params)
        decoder = self.tokenizer.stream_decoder()
        scanner = StopScanner(params.stop)
        history = list(prompt_ids)
        computed = len(history)  # positions whose keys and values are in the seat
        eog = frozenset() if params.ignore_eos else self.tokenizer.eog_ids
        for step in range(budget):
            if constraint is not None:
                allowed = self._constrain(logits, constraint)
                if allowed is None:
                    yield self._finish(seat, history, computed, "stop")
                    return
                token = sampler.sample(logits, history, allowed=allowed)
                constraint.advance(self.token_pieces()[token])
            else:
                token = sampler.sample(logits, history)
            alternatives: list[tuple[int, float]] = []
            logprob = None
            if params.top_logprobs:
                logprob, alternatives = token_logprobs(logits, token, params.top_logprobs)
            if token in eog:
                tail = scanner.push(decoder.flush()) + scanner.flush()
                if tail:
                    yield TokenEvent(-1, tail)
                yield self._finish(seat, history, computed, "stop")
                return
            history.append(token)
            text = scanner.push(decoder.push(token))
            complete = constraint is not None and constraint.complete
            pending = None
            if not (complete or scanner.stopped) and step + 1 < budget:
                pending = seat.submit(np.int32(token), len(history) - 1)
            yield TokenEvent(token, text, alternatives, logprob)
            if complete:
                tail = scanner.push(decoder.flush()) + scanner.flush()
                if tail:
                    yield TokenEvent(-1, tail)
                yield self._finish(seat, history, computed, "stop")
                return
            if scanner.stopped:
                yield self._finish(seat, history, computed, FinishReason.stopped_by(scanner.matched))
                return
            if pending is not None:
                logits = pending.result()
                computed = len(history)
        tail = scanner.push(decoder.flush()) + scanner.flush()
        if tail:
            yield TokenEvent(-1, tail)
        yield self._finish(seat, history, computed, "length")

    def _finish(self, seat: _Seat, history: list[int], computed: int, reason: str) -> str:
        """`reason`, once the prefix cache holds the whole blocks of this exchange that the
        prefill did not store: those reaching into the generated tokens, whose keys and
        values the decode steps wrote (the first `computed` positions of `history`). A
        follow-up whose prompt repeats the exchange, as a chat's next turn does, then
        computes only what comes after it."""
        prefix = self.prefix_cache
        if prefix is not None:
            for first, stop, key in prefix.missing(history[:computed]):
                if stop - first == BLOCK_TOKENS:  # not the tail: no later prompt ends there
                    prefix.store(key, Block(*seat.rows(first, stop)))
        return reason

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> GenerationResult:
        return collect(self.stream(prompt_ids, params), prompt_ids, params)


def collect(
    events: Iterator[TokenEvent | str], prompt_ids: Sequence[int], params: SamplingParams
) -> GenerationResult:
    """Gather a token stream (TokenEvents, then a finish reason) into one result."""
    result = GenerationResult(prompt_token_ids=list(prompt_ids))
    pieces = []
    for event in events:
        if isinstance(event, str):
            result.finish_reason = event
            break
        pieces.append(event.text)
        if event.token_id >= 0:
            result.token_ids.append(event.token_id)
            if params.top_logprobs:
                result.top_logprobs.append(event.top_logprobs)
    result.text = "".join(pieces)
    return result
