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

The cache grows (powers of two, up to `max_capacity` positions) as sessions need
more; a session needing more than that, or finding every row taken, keeps a cache of
its own (`acquire` returns None).

Depends only on the engine interface below; tests drive it with a stand-in engine.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from swarm.errors import InvalidRequestError

MIN_CAPACITY = 256


class BatchEngine(Protocol):
    """What a SlotBatch needs from an engine (swarm.engine.Engine provides it)."""

    def new_cache(self, capacity: int, batch: int = 1) -> Any: ...

    def forward(self, inputs: np.ndarray, start: int, cache: Any, *, slot: int | None = None) -> Any: ...

    def step(self, inputs: np.ndarray, positions: np.ndarray, slots: np.ndarray, cache: Any) -> Any: ...

    def with_rows(self, cache: Any, keys: np.ndarray, values: np.ndarray, slot: int = 0) -> Any: ...

    def cache_rows(self, cache: Any, start: int, stop: int, slot: int = 0) -> Any: ...

    def grow_cache(self, cache: Any, capacity: int) -> Any: ...


class Ticket:
    """One queued decode step; `result()` is its output row (logits or hidden state)."""

    def __init__(self, batch: SlotBatch, slot: int, inputs: np.ndarray, position: int):
        self.batch = batch
        self.slot = slot
        self.inputs = inputs
        self.position = position
        self.done = threading.Event()
        self._output: np.ndarray | None = None
        self._error: BaseException | None = None

    def _finish(self, output: np.ndarray | None, error: BaseException | None = None) -> None:
        self._output, self._error = output, error
        self.done.set()

    def result(self) -> np.ndarray:
        while not self.done.is_set():
            self.batch.flush()
        if self._error is not None:
            raise self._error
        assert self._output is not None
        return self._output


@dataclass
class BatchStats:
    steps: int = 0  # compiled step calls
    rows: int = 0  # decode steps they ran (rows / steps = mean batch)
    widest: int = 0  # the most sessions one call has carried

    def as_dict(self) -> dict[str, Any]:
        mean = self.rows / self.steps if self.steps else 0.0
        return {"steps": self.steps, "rows": self.rows, "mean_rows": round(mean, 2), "widest": self.widest}


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
        self._lock = threading.Lock()  # the free rows and the queue
        self._device = threading.Lock()  # one engine call on the shared cache at a time

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
            self._reserve(positions)
        except BaseException:
            self.release(slot)
            raise
        return slot

    def release(self, slot: int) -> None:
        """Frees `slot`; a step it still had queued is dropped unrun."""
        with self._lock:
            ticket = self._queued.pop(slot, None)
            if slot not in self._free:
                self._free.append(slot)
        if ticket is not None:
            ticket._finish(None, InvalidRequestError("the session left the batch"))

    def _reserve(self, positions: int) -> None:
        """Grows the shared cache (keeping what it holds) to hold `positions` per row."""
        with self._device:
            if positions <= self._capacity:
                return
            capacity = max(MIN_CAPACITY, self._capacity)
            while capacity < positions:
                capacity *= 2
            capacity = min(capacity, self.max_capacity)
            if self._cache is None:
                self._cache = self.engine.new_cache(capacity, self.slots)
            else:
                self._cache = self.engine.grow_cache(self._cache, capacity)
            self._capacity = capacity

    # --- device work ---------------------------------------------------------------------

    def prefill(self, slot: int, inputs: np.ndarray, start: int, **options: Any) -> np.ndarray:
        """Runs a session's prompt (or a chunk of it) into its row; the engine's output."""
        with self._device:
            out, self._cache = self.engine.forward(inputs, start, self._cache, slot=slot, **options)
        return out

    def load_rows(self, slot: int, keys: np.ndarray, values: np.ndarray) -> None:
        """Puts cached keys and values at positions [0, n) of `slot` (a prefix-cache hit)."""
        with self._device:
            self._cache = self.engine.with_rows(self._cache, keys, values, slot)

    def rows(self, slot: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of `slot`'s keys and values at positions [start, stop)."""
        with self._device:
            return self.engine.cache_rows(self._cache, start, stop, slot)

    def warm_up(self, example: np.ndarray) -> None:
        """Compiles the step for every batch width (1, 2, 4, ... slots) before any session
        joins, so the first time several run together nobody waits for a compile.

        example: one step's input (a token id or a hidden state) of the engine's kind.
        """
        self._reserve(MIN_CAPACITY)
        with self._device:
            width = 1
            while True:
                rows = min(width, self.slots)
                inputs = np.stack([np.asarray(example)] * rows)
                zeros = np.zeros(rows, np.int32)
                _, self._cache = self.engine.step(inputs, zeros, np.arange(rows, dtype=np.int32), self._cache)
                if rows == self.slots:
                    break
                width *= 2

    def submit(self, slot: int, inputs: np.ndarray, position: int) -> Ticket:
        """Queues one decode step of `slot` at `position`; returns at once."""
        ticket = Ticket(self, slot, np.asarray(inputs), position)
        with self._lock:
            if slot in self._free:
                raise InvalidRequestError(f"slot {slot} is not held by a session")
            if slot in self._queued:
                raise InvalidRequestError(f"slot {slot} already has a step queued")
            self._queued[slot] = ticket
        return ticket

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
                    np.stack([t.inputs for t in tickets]),
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
        for ticket, output in zip(tickets, outputs, strict=True):
            ticket._finish(output)
