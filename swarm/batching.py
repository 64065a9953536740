"""Continuous batching: many sessions' decode steps in one compiled call.

Owns `SlotBatch`, a KV cache of `slots` rows shared by the sessions of one engine, and
the step queue over it. A session takes a free row (`acquire`), prefills into it
(`prefill`, or `load_rows` for a cached prefix), then asks for each decode step with
`submit`, which only queues it. `flush` runs every queued step in one `Engine.step`
call. A caller that needs its answer and finds it not yet computed flushes itself, so
steps batch by group commit: whoever reaches the device first runs everything queued
by then, and sessions arriving while a step runs go together in the next one. A lone
session pays no wait; a busy node runs one step for all its sessions. Sessions join
and leave between steps; `release` drops a leaving session's queued step so that it
can never write into the row's next owner.

Prompt chunks queue the same way (`submit_prompt`, run by `flush_prompts`): the chunks
of sessions in consecutive rows that each fit one bucket of the same size go in one
`Engine.forward_rows` call, so a burst of short prompts is one call rather than one
each (eight of 32 tokens: 132 ms against 196 ms on two cores). Such a call's shape
compiles in the background the first time it is wanted; until then its chunks run one
by one.

The cache holds `max_capacity` positions per row, allocated when the first session
joins; a session needing more than that, or finding every row taken, keeps a cache of
its own (`acquire` returns None).

Depends only on the engine interface below; tests drive it with a stand-in engine.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from swarm.errors import InvalidRequestError
from swarm.prefix_cache import Rows

log = logging.getLogger(__name__)

# Steps ahead of the furthest session at which the next attention bound's step is compiled.
LOOKAHEAD = 64


class BatchEngine(Protocol):
    """What a SlotBatch needs from an engine (swarm.engine.Engine provides it)."""

    def new_cache(self, capacity: int, batch: int = 1) -> Any: ...

    def forward(self, inputs: np.ndarray, start: int, cache: Any, *, slot: int | None = None) -> Any: ...

    def step(self, inputs: np.ndarray, positions: np.ndarray, slots: np.ndarray, cache: Any) -> Any: ...

    def step_shape(self, count: int, position: int, capacity: int, total: int) -> tuple[int, int]: ...

    def prepare_step(self, count: int, position: int, cache: Any) -> bool: ...

    def prepare_prefill(self, steps: int, cache: Any, rows: int = 1, end: int | None = None) -> bool: ...

    def chunk_steps(self, count: int) -> int | None: ...

    def chunk_buckets(self, chunk: int) -> list[int]: ...

    def prompt_shape(self, rows: int, steps: int, end: int, capacity: int) -> Hashable: ...

    def forward_rows(
        self, pieces: Sequence[np.ndarray], starts: Sequence[int], first: int, cache: Any
    ) -> tuple[np.ndarray, Any]: ...

    def with_rows(self, cache: Any, keys: Rows, values: Rows, slot: int = 0) -> Any: ...

    def cache_rows(self, cache: Any, start: int, stop: int, slot: int = 0) -> Any: ...

    def takes_token_ids(self, inputs: np.ndarray) -> bool: ...

    def embed_tokens(self, token_ids: np.ndarray) -> np.ndarray: ...


class Ticket:
    """One queued decode step, or prompt chunk (`prompt`: its inputs are the chunk's token
    ids, `position` its first); `result()` is its output row (logits or hidden state)."""

    def __init__(self, batch: SlotBatch, slot: int, inputs: np.ndarray, position: int, prompt: bool = False):
        self.batch = batch
        self.slot = slot
        self.inputs = inputs
        self.position = position
        self.prompt = prompt
        # Set by the flush that ran it (or by `release`, which drops it): `result()` only
        # reads it between flushes of its own, and nothing blocks on it, so a flag serves.
        self.done = False
        self._output: np.ndarray | None = None
        self._error: BaseException | None = None

    def _finish(self, output: np.ndarray | None, error: BaseException | None = None) -> None:
        self._output, self._error = output, error
        self.done = True

    def result(self) -> np.ndarray:
        flush = self.batch.flush_prompts if self.prompt else self.batch.flush
        while not self.done:
            flush()
        if self._error is not None:
            raise self._error
        assert self._output is not None
        return self._output


@dataclass
class BatchStats:
    steps: int = 0  # compiled step calls
    rows: int = 0  # decode steps they ran (rows / steps = mean batch)
    widest: int = 0  # the most sessions one call has carried
    prompt_calls: int = 0  # calls that ran queued prompt chunks
    prompt_chunks: int = 0  # the chunks they ran (prompt_chunks / prompt_calls: chunks per call)

    def as_dict(self) -> dict[str, Any]:
        mean = self.rows / self.steps if self.steps else 0.0
        return {
            "steps": self.steps,
            "rows": self.rows,
            "mean_rows": round(mean, 2),
            "widest": self.widest,
            "prompt_calls": self.prompt_calls,
            "prompt_chunks": self.prompt_chunks,
        }


_live: weakref.WeakSet[SlotBatch] = weakref.WeakSet()  # batches compiling in the background


@atexit.register
def _stop_all_preparing() -> None:
    for batch in list(_live):
        batch.stop_preparing()


class SlotBatch:
    """`slots` cache rows of `engine`, each holding one session, stepped together."""

    def __init__(self, engine: BatchEngine, slots: int, max_capacity: int):
        if slots < 1:
            raise InvalidRequestError("a batch needs at least one slot")
        self.engine = engine
        self.slots = slots
        self.max_capacity = max_capacity
        self.stats = BatchStats()
        self._cache: Any = None
        self._capacity = 0
        self._free = list(range(slots))
        self._queued: dict[int, Ticket] = {}
        self._prompts: dict[int, Ticket] = {}  # queued prompt chunks, by row
        self._lock = threading.Lock()  # the free rows and the queues
        self._device = threading.Lock()  # one engine call on the shared cache at a time
        self._prepared: set[Hashable] = set()  # step shapes and chunk sizes compiled or asked for
        self._ready: set[Hashable] = set()  # the shapes of prompt calls compiled (prompt_shape)
        # (shape, what to compile) in order; None ends the background thread.
        self._to_prepare: queue.SimpleQueue[tuple[Hashable, tuple] | None] = queue.SimpleQueue()
        self._preparer: threading.Thread | None = None

    @property
    def capacity(self) -> int:
        return self._capacity

    def in_use(self) -> int:
        with self._lock:
            return self.slots - len(self._free)

    # --- joining and leaving ----------------------------------------------------------

    def acquire(self, positions: int) -> int | None:
        """A free row for a session of up to `positions` positions; None if none fits."""
        if positions > self.max_capacity:
            return None
        with self._lock:
            if not self._free:
                return None
            slot = min(self._free)  # the lowest free row: busy rows stay packed together
            self._free.remove(slot)
        try:
            self._reserve()
        except BaseException:
            self.release(slot)
            raise
        return slot

    def release(self, slot: int) -> None:
        """Frees `slot`; a step or prompt chunk it still had queued is dropped unrun."""
        with self._lock:
            tickets = [self._queued.pop(slot, None), self._prompts.pop(slot, None)]
            if slot not in self._free:
                self._free.append(slot)
        for ticket in tickets:
            if ticket is not None:
                ticket._finish(None, InvalidRequestError("the session left the batch"))

    def _reserve(self) -> None:
        """Allocates the shared cache, at its full size, when the first session joins: one
        size means no step or prefill ever compiles again for a larger cache."""
        with self._device:
            if self._cache is None:
                self._cache = self.engine.new_cache(self.max_capacity, self.slots)
                self._capacity = self.max_capacity

    # --- device work ---------------------------------------------------------------------

    def prefill(self, slot: int, inputs: np.ndarray, start: int, **options: Any) -> np.ndarray:
        """Runs a session's prompt (or a chunk of it) into its row; the engine's output."""
        with self._device:
            out, self._cache = self.engine.forward(inputs, start, self._cache, slot=slot, **options)
        return out

    def load_rows(self, slot: int, keys: Rows, values: Rows) -> None:
        """Puts cached keys and values at positions [0, n) of `slot` (a prefix-cache hit):
        f[layers, n, ...] each, or sequences of such pieces (consecutive positions)."""
        with self._device:
            self._cache = self.engine.with_rows(self._cache, keys, values, slot)

    def rows(self, slot: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of `slot`'s keys and values at positions [start, stop)."""
        with self._device:
            return self.engine.cache_rows(self._cache, start, stop, slot)

    def warm_up(self, chunks: Sequence[int] = (), prompts: Sequence[tuple[int, int]] = ()) -> None:
        """Compiles the one-session step now and, on a background thread, the prompt
        chunks of each size in `chunks` (the engine's buckets a prompt is cut to: every
        request needs some), then the steps of every wider batch (2, 4, ... slots),
        then the calls of several sessions' prompt chunks in `prompts` ((rows, bucket)
        each, as `flush_prompts` groups them), before sessions need them."""
        self._reserve()
        self.engine.prepare_step(1, 0, self._cache)
        self._prepared.add(self.engine.step_shape(1, 0, self._capacity, self.slots))
        for steps in chunks:
            self._enqueue(("prefill", steps), ("prefill", steps))
        width = 2
        while width < 2 * self.slots:
            self._prepare(min(width, self.slots), 0)
            width *= 2
        for rows, steps in prompts:
            self._prepare_prompts(rows, steps, steps)

    def warm_up_chunked(self, chunk: int) -> None:
        """`warm_up` for prompts cut into `chunk`-token pieces (0: whole), a round taking
        in up to `chunk` prompt tokens: every bucket such a piece runs as, and the calls
        that run several of them together."""
        chunks = self.engine.chunk_buckets(chunk)
        self.warm_up(chunks, self.prompt_call_shapes(chunks, chunk))

    def prompt_call_shapes(self, chunks: Sequence[int], budget: int) -> list[tuple[int, int]]:
        """The (rows, bucket) calls `flush_prompts` can make when a round takes in up to
        `budget` prompt tokens in chunks of the sizes in `chunks`: a power of two rows,
        2 or more, of one bucket, within the batch and the budget."""
        groups = []
        for steps in chunks:
            rows = 2
            while rows <= self.slots and rows * steps <= budget:
                groups.append((rows, steps))
                rows *= 2
        return groups

    def _prepare(self, count: int, position: int) -> None:
        """Has the step of `count` sessions reaching `position` compiled in the background,
        once, so that sessions reaching a new attention bound or a wider batch never wait
        for a compile."""
        shape = self.engine.step_shape(count, position, self._capacity, self.slots)
        self._enqueue(shape, ("step", count, position))

    def _prepare_prompts(self, rows: int, steps: int, end: int) -> None:
        """Has the call of `rows` sessions' prompt chunks of bucket `steps` reaching
        position `end` compiled in the background, once."""
        shape = ("prompts", self.engine.prompt_shape(rows, steps, end, self._capacity))
        self._enqueue(shape, ("prompts", rows, steps, end))

    def settle(self, timeout: float | None = None) -> bool:
        """Waits until the background compiles asked for so far are done (a benchmark's
        timed part then measures no compile); False if `timeout` seconds passed first."""
        done = threading.Event()
        self._enqueue(("settled", id(done)), ("settled", done))
        return done.wait(timeout)

    def _enqueue(self, shape: Hashable, item: tuple) -> None:
        with self._lock:  # flushes on several threads (a stage's sessions) ask at once
            if shape in self._prepared:
                return
            if item[0] != "settled":
                self._prepared.add(shape)
            self._to_prepare.put((shape, item))
            if self._preparer is None:
                self._preparer = threading.Thread(
                    target=self._prepare_loop, name="batch-compile", daemon=True
                )
                self._preparer.start()
                _live.add(self)

    def _prepare_loop(self) -> None:
        while True:
            entry = self._to_prepare.get()
            if entry is None:
                return
            shape, item = entry
            try:
                if item[0] == "settled":
                    item[1].set()
                elif item[0] == "prefill":
                    self.engine.prepare_prefill(item[1], self._cache)
                elif item[0] == "prompts":
                    self.engine.prepare_prefill(item[2], self._cache, item[1], item[3])
                    self._ready.add(shape[1])
                else:
                    self.engine.prepare_step(item[1], item[2], self._cache)
            except Exception:  # the program compiles when first run instead
                log.exception("compiling a batch step ahead of time failed")

    def stop_preparing(self) -> None:
        """Ends the background compiles after the one under way (XLA must not be
        compiling while the interpreter shuts down). Those dropped unstarted are asked
        for again when next wanted."""
        thread = self._preparer
        if thread is not None:
            while not self._to_prepare.empty():
                try:
                    entry = self._to_prepare.get_nowait()
                except queue.Empty:
                    break
                if entry is not None and entry[1][0] == "settled":
                    entry[1][1].set()  # nothing more will compile
                elif entry is not None:
                    with self._lock:
                        self._prepared.discard(entry[0])
            self._to_prepare.put(None)
            thread.join(timeout=120)
            self._preparer = None

    def submit(self, slot: int, inputs: np.ndarray, position: int) -> Ticket:
        """Queues one decode step of `slot` at `position`; returns at once."""
        return self._queue(Ticket(self, slot, np.asarray(inputs), position), self._queued, "a step")

    def _queue(self, ticket: Ticket, queued: dict[int, Ticket], what: str) -> Ticket:
        """Puts `ticket` in `queued` (the steps or the prompt chunks): one per held row."""
        with self._lock:
            if ticket.slot in self._free:
                raise InvalidRequestError(f"slot {ticket.slot} is not held by a session")
            if ticket.slot in queued:
                raise InvalidRequestError(f"slot {ticket.slot} already has {what} queued")
            queued[ticket.slot] = ticket
        return ticket

    def submit_prompt(self, slot: int, token_ids: np.ndarray, start: int) -> Ticket:
        """Queues a prompt chunk of `slot` (token ids i32[T] at positions start..), to run
        with the other queued chunks by `flush_prompts`; returns at once."""
        ticket = Ticket(self, slot, np.asarray(token_ids, np.int32), start, prompt=True)
        if len(ticket.inputs) == 0:
            raise InvalidRequestError("empty input")
        return self._queue(ticket, self._prompts, "a prompt chunk")

    def flush_prompts(self) -> None:
        """Runs every queued prompt chunk: those of consecutive rows that fit one bucket
        of the same size together (`forward_rows`, in groups of a power of two rows,
        once that call's shape is compiled), the others one by one. Every chunk taken
        from the queue gets its answer or the error that stopped it."""
        finished: dict[int, tuple[Ticket, np.ndarray | None, BaseException | None]] = {}
        with self._device:
            with self._lock:
                tickets = sorted(self._prompts.values(), key=lambda ticket: ticket.slot)
                self._prompts.clear()
            try:
                for group in self._prompt_groups(tickets):
                    try:
                        outputs = self._run_prompts(group)
                    except Exception as error:  # only this call's sessions fail
                        finished.update((id(ticket), (ticket, None, error)) for ticket in group)
                        continue
                    for ticket, output in zip(group, outputs, strict=True):
                        finished[id(ticket)] = (ticket, output, None)
            except BaseException as error:
                for ticket in tickets:
                    finished.setdefault(id(ticket), (ticket, None, error))
                raise
            finally:
                for ticket, output, failure in finished.values():
                    ticket._finish(output, failure)

    def _run_prompts(self, group: list[Ticket]) -> Sequence[np.ndarray]:
        """One engine call for the chunks of `group` (consecutive rows); their outputs."""
        if len(group) == 1:
            (ticket,) = group
            out, self._cache = self.engine.forward(
                ticket.inputs, ticket.position, self._cache, slot=ticket.slot
            )
            outputs: Sequence[np.ndarray] = [out]
        else:
            outputs, self._cache = self.engine.forward_rows(
                [ticket.inputs for ticket in group],
                [ticket.position for ticket in group],
                group[0].slot,
                self._cache,
            )
        self.stats.prompt_calls += 1
        self.stats.prompt_chunks += len(group)
        return outputs

    def _prompt_groups(self, tickets: list[Ticket]) -> list[list[Ticket]]:
        """`tickets` (by row) cut into the calls that run them: runs of consecutive rows
        whose chunks share a one-call bucket, cut into groups of a power of two rows
        (7 rows: 4 + 2 + 1), each the most rows whose call is compiled (the larger
        calls are compiled in the background for next time); every other chunk alone."""
        runs: list[tuple[int | None, list[Ticket]]] = []  # (bucket, consecutive rows)
        for ticket in tickets:
            bucket = self.engine.chunk_steps(len(ticket.inputs))
            if (
                runs
                and bucket is not None
                and runs[-1][0] == bucket
                and ticket.slot == runs[-1][1][-1].slot + 1
            ):
                runs[-1][1].append(ticket)
            else:
                runs.append((bucket, [ticket]))
        groups: list[list[Ticket]] = []
        for bucket, run in runs:
            while run:
                rows = 1
                while rows * 2 <= len(run):
                    rows *= 2
                while rows > 1 and bucket is not None:
                    end = max(ticket.position for ticket in run[:rows]) + bucket
                    if self.prompts_ready(rows, bucket, end):
                        break
                    self._prepare_prompts(rows, bucket, end)
                    rows //= 2
                groups.append(run[:rows])
                run = run[rows:]
        return groups

    def prompts_ready(self, rows: int, steps: int, end: int | None = None) -> bool:
        """Whether the call of `rows` sessions' prompt chunks of bucket `steps` reaching
        position `end` (default: chunks from position 0) is compiled."""
        return (
            self.engine.prompt_shape(rows, steps, steps if end is None else end, self._capacity)
            in self._ready
        )

    def prepare_prompts(self, rows: int, steps: int) -> None:
        """Compiles, now, the call of `rows` sessions' prompt chunks of bucket `steps` from
        position 0 (which `flush_prompts` otherwise has compiled in the background when
        it first wants it)."""
        self._reserve()
        self.engine.prepare_prefill(steps, self._cache, rows, steps)
        shape = self.engine.prompt_shape(rows, steps, steps, self._capacity)
        with self._lock:
            self._prepared.add(("prompts", shape))
        self._ready.add(shape)

    def run(self, slot: int, inputs: np.ndarray, position: int) -> np.ndarray:
        """One decode step, batched with whatever else is queued; waits for its output."""
        return self.submit(slot, inputs, position).result()

    def flush(self) -> None:
        """Runs every queued step in one engine call (nothing if the queue is empty)."""
        with self._device:
            with self._lock:
                tickets = list(self._queued.values())
                self._queued.clear()
            if not tickets:
                return
            try:
                outputs, self._cache = self.engine.step(
                    _step_inputs(self.engine, [t.inputs for t in tickets], self.slots),
                    np.asarray([t.position for t in tickets], np.int32),
                    np.asarray([t.slot for t in tickets], np.int32),
                    self._cache,
                )
            except BaseException as error:
                for ticket in tickets:
                    ticket._finish(None, error)
                if not isinstance(error, Exception):
                    raise
                return
            self.stats.steps += 1
            self.stats.rows += len(tickets)
            self.stats.widest = max(self.stats.widest, len(tickets))
            furthest = max(ticket.position for ticket in tickets)
            span = max(t.slot for t in tickets) - min(t.slot for t in tickets) + 1
        # What the next steps will need: a bound further on, and room for one more session.
        self._prepare(span, furthest + LOOKAHEAD)
        if span < self.slots:
            self._prepare(span + 1, furthest)
        for ticket, output in zip(tickets, outputs, strict=True):
            ticket._finish(output)


def _step_inputs(engine: BatchEngine, inputs: list[np.ndarray], width: int) -> np.ndarray:
    """One step's inputs stacked: token ids i32[B], or hidden states f32[B, d]. Sessions of
    both kinds share a step (a node's own requests and peers' pipeline sessions, which
    arrive embedded): then the token ids are embedded here, in one call padded to the
    batch's `width` (one compiled shape), to the very rows the step's own embedding gives."""
    ids = [index for index, value in enumerate(inputs) if engine.takes_token_ids(value)]
    if ids and len(ids) < len(inputs):
        tokens = np.zeros(max(width, len(ids)), np.int32)
        tokens[: len(ids)] = [inputs[index] for index in ids]
        rows = engine.embed_tokens(tokens)
        inputs = list(inputs)
        for row, index in enumerate(ids):
            inputs[index] = rows[row]
    return np.stack(inputs)
