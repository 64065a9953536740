"""The compiled engine for one layer range: what a pipeline stage calls.

Owns jit compilation at the edges (one compiled forward per prompt-length bucket and
cache-capacity bucket), padding prompts to buckets, cache allocation, and donation of
the KV cache into each step. A range that starts at layer 0 takes token ids; any other
takes hidden states. A range that ends at the last layer returns logits; any other
returns hidden states.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels import cpu as cpu_kernels
from kernels import ops
from swarm import model
from swarm.errors import ContextOverflowError, InvalidRequestError
from swarm.gguf_file import GGUFFile
from swarm.model import KVCache, RangeWeights
from swarm.model_config import ModelConfig
from swarm.prefix_cache import Rows
from swarm.sampling import ScoredRows
from swarm.weights import load_range_weights

PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512)
MIN_CACHE = 256
# What one more forward call costs on CPU, in prompt rows, per core: the fixed part of a
# call (streaming every weight once, the dispatch) measured 5-9 ms against about 0.5 ms
# a row for SmolLM2 and Gemma 3 on two cores, so 16 rows there. A row's compute spreads
# over the cores while the weights stream no faster, so more cores make a call dearer in
# rows. On a GPU a call's rows are nearly free: padding a chunk to its bucket beats any
# extra call.
CPU_CALL_ROWS_PER_CORE = 8


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (which containers narrow) where
    the OS has one (not macOS), else every CPU."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def chunk_plan(total: int, buckets: tuple[int, ...], call_rows: int) -> list[tuple[int, int]]:
    """How `total` prompt tokens go through the compiled buckets: (tokens, bucket) per
    call, in order. Whole largest buckets go first; the rest is cut to the fewest padded
    rows plus `call_rows` per call (a single token runs as a one-row call). A 129-token
    prompt then runs as 128 + 1 instead of one call padded to 256, which cost twice the
    compute on CPU."""
    largest = buckets[-1]
    plan = [(largest, largest)] * ((total - 1) // largest)
    rest = total - largest * len(plan)
    choices = _remainder_choices(buckets, call_rows)
    while rest > 0:
        take, bucket = choices[rest]
        plan.append((take, bucket))
        rest -= take
    return plan


@lru_cache(maxsize=8)
def _remainder_choices(buckets: tuple[int, ...], call_rows: int) -> list[tuple[int, int]]:
    """For n in [0, largest bucket], the first call of n tokens' cheapest plan (cost:
    bucket rows plus call_rows per call; among equal costs, fewer calls, and the longest
    call first)."""
    largest = buckets[-1]
    best: list[tuple[int, int]] = [(0, 0)]  # (cost, calls) of n tokens
    first: list[tuple[int, int]] = [(0, 0)]
    for n in range(1, largest + 1):
        options = [(1, 1)] + [(min(bucket, n), bucket) for bucket in buckets]
        scored = []
        for take, bucket in options:
            cost, calls = best[n - take]
            scored.append((cost + bucket + call_rows, calls + 1, -take, bucket))
        cost, calls, take, bucket = min(scored)
        best.append((cost, calls))
        first.append((-take, bucket))
    return first


@dataclass(frozen=True)
class EngineSettings:
    """How the engine runs.

    weights: "auto" (packed: GGUF blocks in memory, decoded inside the products; on a
    CPU that cannot build the kernels.cpu custom call, f32), "f32" or "packed".
    layers: "auto", "scan" or "unroll". Under a scan, compile time stays flat in the
    layer count; unrolled, XLA on CPU streams each layer's weights without copying
    them out of a stacked array first (measured: 35 % faster decode, compile
    0.5 s instead of 0.2 s for 18 layers). auto unrolls on CPU, scans elsewhere.
    """

    weights: str = "auto"
    kv_cache: str = "f16"  # "f16" (as llama.cpp's default, half the memory) or "f32"
    layers: str = "auto"
    prefill_buckets: tuple[int, ...] = PREFILL_BUCKETS
    # What one more prefill call costs, in padded rows, when a prompt is cut to the
    # buckets (chunk_plan); None: CPU_CALL_ROWS_PER_CORE times the usable cores on CPU,
    # and on a GPU each chunk in one call padded to its bucket.
    prefill_call_rows: int | None = None
    max_context: int | None = None  # cap below the model's context length (memory)
    # Which products and attention the forward traces: "auto" (the fastest for the
    # device) or any of kernels.ops.IMPLS ("reference": the jnp twins every kernel is
    # tested against).
    kernels: str = "auto"

    def unrolled_layers(self) -> bool:
        if self.layers not in ("auto", "scan", "unroll"):
            raise InvalidRequestError(f"unknown layers setting {self.layers!r} (auto, scan or unroll)")
        if self.layers == "auto":
            return jax.default_backend() == "cpu"
        return self.layers == "unroll"

    def call_rows(self) -> int:
        if self.prefill_call_rows is not None:
            return self.prefill_call_rows
        if jax.default_backend() != "cpu":
            return 1 << 30
        return CPU_CALL_ROWS_PER_CORE * usable_cpus()

    def packed_weights(self) -> bool:
        if self.weights not in ("auto", "f32", "packed"):
            raise InvalidRequestError(f"unknown weights setting {self.weights!r} (auto, f32 or packed)")
        if self.weights == "auto":
            # On CPU, packed only with the kernels.cpu custom call: XLA's own
            # dequantize-then-dot of packed bytes is many times slower than f32.
            return jax.default_backend() != "cpu" or cpu_kernels.available()
        return self.weights == "packed"


def _forward(
    config: ModelConfig,
    is_last: bool,
    all_logits: bool,
    kv_bound: int,
    weights: RangeWeights,
    inputs: jax.Array,
    start: jax.Array,
    length: jax.Array,
    rope: tuple[jax.Array, jax.Array],
    cache: KVCache,
    first_row: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]:
    """inputs: f32[B, T, d] hidden states (a first range's embedded token ids).

    start: i32[B] position of inputs[:, 0]; length: i32[B] real (unpadded) steps;
    rope: the rotary tables of those positions (`model.rope_tables`);
    first_row: i32[], sequence b is cache row first_row + b (None: row b).
    Returns logits f32[B, vocab] at the last real step (f32[B, T, vocab] with
    all_logits) for the last range, else hidden states f32[B, T, d]. On the CPU kernel
    path the last range's logits f32[B, vocab] come with each row's greedy token i32[B],
    as a pair (`ops.greedy_tokens`).
    """
    steps = inputs.shape[1]
    positions = start[:, None] + jnp.arange(steps, dtype=jnp.int32)[None, :]
    kv_length = start + length
    hidden, cache = model.run_layers(
        config, weights, inputs, positions, kv_length, cache, rope, kv_bound, first_row
    )
    if not is_last:
        return hidden, cache
    if all_logits:
        return model.head(config, weights, hidden), cache
    hidden = jnp.take_along_axis(hidden, (length - 1)[:, None, None], axis=1)[:, 0]
    logits = model.head(config, weights, hidden)
    best = ops.greedy_tokens(logits)
    return (logits if best is None else (logits, best)), cache


def _forward_leaves(
    config: ModelConfig, is_last: bool, all_logits: bool, kv_bound: int, tree: Any, leaves: tuple, *args: Any
) -> tuple[jax.Array, KVCache]:
    """`_forward` over the weights' leaves (`tree` unflattens them): a call hands the
    dispatcher a flat tuple of arrays, which it checks several times faster than the
    weights' pytree of dataclasses (about 0.2 ms a call for 30 layers' weights)."""
    return _forward(config, is_last, all_logits, kv_bound, jax.tree_util.tree_unflatten(tree, leaves), *args)


def _abstract(tree: Any) -> Any:
    """The shapes and dtypes of a tree of arrays, to compile for without any data."""
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), tree)


def enable_compilation_cache(directory: Path) -> None:
    """Keep compiled programs on disk so the next start skips the XLA compile.

    A process-wide JAX setting: entry points call it once, with the data dir's cache.
    """
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _logits_rows(out: Any) -> np.ndarray:
    """A program's rows on the host: logits with their greedy tokens where the program
    found them (ScoredRows), else the plain array."""
    if isinstance(out, tuple):
        logits, best = out
        return ScoredRows.of(np.asarray(logits), np.asarray(best))
    return np.asarray(out)


def _parts(rows: Rows) -> list[np.ndarray]:
    parts = [np.asarray(rows)] if isinstance(rows, np.ndarray) else [np.asarray(part) for part in rows]
    if not parts:
        raise InvalidRequestError("no cache rows to load")
    return parts


def _joined(parts: list[np.ndarray], padded: int) -> np.ndarray:
    """`parts` one after another along positions (axis 1), zero-padded to `padded`."""
    first = parts[0]
    out = np.empty((first.shape[0], padded, *first.shape[2:]), first.dtype)
    at = 0
    for part in parts:
        out[:, at : at + part.shape[1]] = part
        at += part.shape[1]
    out[:, at:] = 0
    return out


@partial(jax.jit, donate_argnums=0)
def _set_rows(cache: KVCache, keys: jax.Array, values: jax.Array, slot: jax.Array) -> KVCache:
    """cache with keys/values f[layers, 1, n, ...] written at row `slot`, positions [0, n)."""
    zero = jnp.int32(0)
    return KVCache(
        keys=jax.lax.dynamic_update_slice(
            cache.keys, keys.astype(cache.keys.dtype), (zero, slot, zero, zero, zero)
        ),
        values=jax.lax.dynamic_update_slice(
            cache.values, values.astype(cache.values.dtype), (zero, slot, zero, zero, zero)
        ),
    )


class Engine:
    """Layers [first, last) of a model, compiled, with weights on the default device."""

    def __init__(
        self, config: ModelConfig, weights: RangeWeights, first: int, last: int, settings: EngineSettings
    ):
        self.config = config
        self.weights = weights
        self.first = first
        self.last = last
        self.settings = settings
        self.max_context = min(config.context_length, settings.max_context or config.context_length)
        self.compile_seconds = 0.0
        self.compiles = 0  # forward programs compiled (not counting prologues)
        self._compiled: dict[tuple, object] = {}
        self._compiling: dict[tuple, threading.Event] = {}  # keys being compiled, by any thread
        self._compile_lock = threading.Lock()
        self._prologues: dict[tuple[int, int, bool], object] = {}  # per [B, T], embedding or not
        self._embed_tokens: Any = None  # compiled on first use
        self._rope_scales = (weights.rope_theta_scale, weights.rope_freq_scale)
        leaves, self._weight_tree = jax.tree_util.tree_flatten(weights)
        self._weight_leaves = tuple(leaves)
        # Where attention reads only the visible keys, the bound is always the whole cache:
        # one compiled program per chunk size or step width instead of one per bound.
        self._whole_bound = ops.attention_reads_visible_keys(settings.kernels)

    @classmethod
    def load(
        cls,
        gguf: GGUFFile,
        config: ModelConfig,
        layer_range: tuple[int, int] | None = None,
        settings: EngineSettings | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Engine:
        """Layers `layer_range` (all by default) of the model; `progress(done, total)` hears
        the weight bytes read as they load."""
        settings = settings or EngineSettings()
        first, last = layer_range or (0, config.n_layers)
        if settings.kv_cache not in ("f16", "f32"):
            raise InvalidRequestError(f"unknown kv_cache setting {settings.kv_cache!r} (f16 or f32)")
        if settings.kernels not in ops.IMPLS:
            raise InvalidRequestError(
                f"unknown kernels setting {settings.kernels!r} ({', '.join(ops.IMPLS)})"
            )
        weights = load_range_weights(
            gguf,
            config,
            first,
            last,
            packed=settings.packed_weights(),
            unrolled=settings.unrolled_layers(),
            kernels=settings.kernels,
            progress=progress,
        )
        return cls(config, weights, first, last, settings)

    @property
    def is_first(self) -> bool:
        return self.first == 0

    @property
    def is_last(self) -> bool:
        return self.last == self.config.n_layers

    def cache_capacity(self, needed: int) -> int:
        """Smallest power-of-two capacity (at least MIN_CACHE) holding `needed` positions."""
        if needed > self.max_context:
            raise ContextOverflowError(
                f"{needed} tokens exceed the context window of {self.max_context} tokens"
            )
        capacity = MIN_CACHE
        while capacity < needed:
            capacity *= 2
        return min(capacity, max(self.max_context, MIN_CACHE))

    def new_cache(self, capacity: int, batch: int = 1) -> KVCache:
        dtype = jnp.float16 if self.settings.kv_cache == "f16" else jnp.float32
        return model.new_cache(self.config, self.last - self.first, batch, capacity, dtype)

    def _run(
        self,
        all_logits: bool,
        kv_bound: int,
        inputs: np.ndarray,
        start: np.ndarray,
        length: np.ndarray,
        cache: KVCache,
        *window: np.ndarray,
        hidden: bool = False,
    ):
        """Run the compiled forward for these argument shapes, compiling it on first use.

        inputs i32[B, T] or f32[B, T, d], start and length i32[B] (host arrays), the
        cache and optionally the first cache row. hidden: stop before the output norm
        and head even on the last range (embeddings read the final hidden states).
        """
        embeds = self.takes_token_ids(inputs)
        prologue = self._prologue(inputs.shape[:2], embeds)
        if embeds:
            inputs, rope = prologue(
                self.weights.embedding, np.asarray(inputs, np.int32), start, self._rope_scales
            )
        else:
            inputs, rope = np.asarray(inputs, np.float32), prologue(start, self._rope_scales)
        args = (self._weight_leaves, inputs, start, length, rope, cache, *window)
        return self._compiled_for(all_logits, kv_bound, args, hidden)(*args)

    def takes_token_ids(self, inputs: np.ndarray) -> bool:
        """Whether `inputs` are token ids to embed: integers, on a first range. A first range
        also takes hidden states f32[..., d] (a peer's pipeline session, embedded by its
        requester with the same `model.embed`), in the same compiled layers."""
        # np.integer's kinds, without np.issubdtype's cost on every row of every step.
        return self.is_first and np.asarray(inputs).dtype.kind in "iu"

    def embed_tokens(self, token_ids: np.ndarray) -> np.ndarray:
        """i32[...] -> f32[..., d]: the rows the prologue would embed (`model.embed` as a
        program of its own), so that token ids and hidden states can share a step."""
        if self._embed_tokens is None:
            self._embed_tokens = jax.jit(partial(model.embed, self.config))
        return np.asarray(self._embed_tokens(self.weights.embedding, np.asarray(token_ids, np.int32)))

    def _prologue(self, shape: tuple[int, ...], embeds: bool | None = None):
        """The compiled program that prepares a forward's inputs of shape [B, T] (token
        ids, `embeds`: a first range's default) or [B, T, d]: the rotary tables of
        positions start + [0, T) (`model.rope_tables`), and the embedded token ids
        (`model.embed`).

        Both run apart from the layers: the tables so that no layer recomputes them, the
        embedding so that the layers start from the very rows a pipeline's requester
        computes with the same function (`pipeline.Embedder`).
        """
        batch, steps = shape[:2]
        embeds = self.is_first if embeds is None else embeds
        compiled = self._prologues.get((batch, steps, embeds))
        if compiled is not None:
            return compiled
        config = self.config

        def tables(start: jax.Array, scales: tuple[jax.Array, jax.Array]):
            positions = start[:, None] + jnp.arange(steps, dtype=jnp.int32)[None, :]
            return model.rope_tables(positions, *scales, config)

        def embedded(table, token_ids: jax.Array, start: jax.Array, scales: tuple[jax.Array, jax.Array]):
            return model.embed(config, table, token_ids), tables(start, scales)

        vector = jax.ShapeDtypeStruct((batch,), jnp.int32)
        began = time.perf_counter()
        with ops.implementation(self.settings.kernels):
            if embeds:
                ids = jax.ShapeDtypeStruct((batch, steps), jnp.int32)
                lowered = jax.jit(embedded).lower(self.weights.embedding, ids, vector, self._rope_scales)
            else:
                lowered = jax.jit(tables).lower(vector, self._rope_scales)
            compiled = lowered.compile()
        self.compile_seconds += time.perf_counter() - began
        self._prologues[(batch, steps, embeds)] = compiled
        return compiled

    @staticmethod
    def _program_key(all_logits: bool, kv_bound: int, args: tuple, hidden: bool = False) -> tuple:
        """What tells one compiled forward from another: its arguments' shapes and the
        options traced into it."""
        inputs, cache = args[1], args[5]
        windowed = len(args) > 6
        return (inputs.shape, inputs.dtype, cache.keys.shape, all_logits, kv_bound, hidden, windowed)

    def _compiled_for(self, all_logits: bool, kv_bound: int, args: tuple, hidden: bool = False):
        """The compiled forward for these arguments (arrays or ShapeDtypeStructs alike).

        Compiled once: a caller asking for a program another thread is compiling (a
        batch's background compile) waits for it instead of compiling it again."""
        key = self._program_key(all_logits, kv_bound, args, hidden)
        while True:
            with self._compile_lock:
                compiled = self._compiled.get(key)
                if compiled is not None:
                    return compiled
                underway = self._compiling.get(key)
                if underway is None:
                    underway = self._compiling[key] = threading.Event()
                    break
            underway.wait()  # then take its program, or compile here if that one failed
        try:
            began = time.perf_counter()
            produces_logits = self.is_last and not hidden
            with ops.implementation(self.settings.kernels):
                compiled = (
                    jax.jit(
                        partial(
                            _forward_leaves,
                            self.config,
                            produces_logits,
                            all_logits,
                            kv_bound,
                            self._weight_tree,
                        ),
                        donate_argnums=(5,),  # the cache
                    )
                    .lower(*args)
                    .compile()
                )
            with self._compile_lock:
                self.compile_seconds += time.perf_counter() - began
                self.compiles += 1
                self._compiled[key] = compiled
            return compiled
        finally:
            with self._compile_lock:
                del self._compiling[key]
            underway.set()

    def _kv_bound(self, end: int, steps: int, capacity: int) -> int:
        """Cache slots a chunk's attention reads: a power of two past its last position.

        Prompt chunks read only the slots that can be filled (a 128-token prompt in
        a 512-slot cache scores 128 keys, not 512); single decode steps read the
        whole cache so that a generation never stops to compile a larger bound. On the
        CPU kernels, which read only the visible keys, every chunk takes the whole cache.
        """
        if steps == 1 or self._whole_bound:
            return capacity
        bound = steps
        while bound < end:
            bound *= 2
        return min(bound, capacity)

    def forward(
        self,
        inputs: np.ndarray,
        start: int,
        cache: KVCache,
        *,
        all_logits: bool = False,
        hidden: bool = False,
        slot: int | None = None,
    ) -> tuple[np.ndarray, KVCache]:
        """Run one sequence through the range, in bucket-sized chunks.

        inputs: i32[T] token ids or f32[T, d] hidden states, at positions start..start+T,
        in cache row `slot` of a many-session cache (None: a cache of one sequence).
        Returns logits f32[vocab] (f32[T, vocab] with all_logits) or hidden f32[T, d]
        (a range that is not last, or `hidden=True`: the last layer's output, before
        the output norm).
        The cache is consumed (donated); use the returned one.
        """
        total = len(inputs)
        if total == 0:
            raise InvalidRequestError("empty input")
        if start + total > cache.capacity:
            raise ContextOverflowError(f"{start + total} positions exceed the cache of {cache.capacity}")
        outputs = []
        done = 0
        window = () if slot is None else (np.int32(slot),)
        for take, steps in chunk_plan(total, self.settings.prefill_buckets, self.settings.call_rows()):
            chunk = inputs[done : done + take]
            padded = np.zeros((1, steps, *chunk.shape[1:]), chunk.dtype)
            padded[0, : len(chunk)] = chunk
            is_final_chunk = done + len(chunk) == total
            want_all = all_logits or hidden or not self.is_last
            out, cache = self._run(
                all_logits and self.is_last and not hidden,
                self._kv_bound(start + done + steps, steps, cache.capacity),
                padded,
                np.asarray([start + done], np.int32),
                np.asarray([len(chunk)], np.int32),
                cache,
                *window,
                hidden=hidden,
            )
            if want_all:
                outputs.append(np.asarray(out[0, : len(chunk)]))
            elif is_final_chunk:
                outputs.append(_logits_rows(out)[0])
            done += len(chunk)
        return (np.concatenate(outputs) if len(outputs) > 1 else outputs[0]), cache

    def chunk_buckets(self, chunk: int) -> list[int]:
        """The buckets a prompt cut into `chunk`-token pieces (0: whole) runs as: every one
        up to the first that holds a whole piece."""
        buckets = self.settings.prefill_buckets
        largest = next((b for b in buckets if b >= chunk), buckets[-1]) if chunk else buckets[-1]
        return [b for b in buckets if b <= largest]

    def prompt_shape(self, rows: int, steps: int, end: int, capacity: int) -> tuple[int, int, int]:
        """What tells one compiled `forward_rows` call from another: its rows, its bucket
        and the attention bound of chunks reaching position `end` in a cache of
        `capacity` (on the CPU kernels the whole cache, wherever the chunks start)."""
        return rows, steps, self._kv_bound(end, steps, capacity)

    def chunk_steps(self, count: int) -> int | None:
        """The bucket a prompt chunk of `count` tokens runs as when it goes in one call
        (`forward` cuts it so), None when `forward` would cut it into several."""
        plan = chunk_plan(count, self.settings.prefill_buckets, self.settings.call_rows()) if count else []
        return plan[0][1] if len(plan) == 1 else None

    def forward_rows(
        self, pieces: Sequence[np.ndarray], starts: Sequence[int], first: int, cache: KVCache
    ) -> tuple[np.ndarray, KVCache]:
        """Prompt chunks of several sessions of a many-session cache in one call: piece i
        (token ids i32[T_i]) at positions starts[i].. of cache row first + i.

        Every piece must run as one call of the same bucket (`chunk_steps`); together
        they are one program over the rows first .. first + len(pieces) - 1, each
        padded to the bucket as `forward` pads one. Returns logits f32[n, vocab] at each
        piece's last token: on the CPU kernels, which read only each query's visible
        keys, the very rows `forward` gives each piece alone (elsewhere the attention
        bound is the furthest piece's, which masked keys only pad). Needs the whole model
        (token ids in, logits out). The cache is consumed (donated).
        """
        count = len(pieces)
        if not (self.is_first and self.is_last):
            raise InvalidRequestError("prompt chunks of several sessions need an engine holding every layer")
        if count == 0 or len(starts) != count or first < 0 or first + count > cache.keys.shape[1]:
            raise InvalidRequestError("forward_rows needs one start per piece, in rows of the cache")
        steps = {self.chunk_steps(len(piece)) for piece in pieces}
        if len(steps) != 1 or None in steps:
            raise InvalidRequestError("the pieces of one call must each fit the same prompt bucket")
        (bucket,) = steps
        ends = [start + len(piece) for start, piece in zip(starts, pieces, strict=True)]
        if max(ends) > cache.capacity:
            raise ContextOverflowError(f"{max(ends)} positions exceed the cache of {cache.capacity}")
        padded = np.zeros((count, bucket), np.int32)
        for row, piece in enumerate(pieces):
            padded[row, : len(piece)] = piece
        _, _, bound = self.prompt_shape(count, bucket, max(starts) + bucket, cache.capacity)
        out, cache = self._run(
            False,
            bound,
            padded,
            np.asarray(starts, np.int32),
            np.asarray([len(piece) for piece in pieces], np.int32),
            cache,
            np.int32(first),
        )
        return _logits_rows(out), cache

    def step(
        self, inputs: np.ndarray, positions: np.ndarray, slots: np.ndarray, cache: KVCache
    ) -> tuple[np.ndarray, KVCache]:
        """One decode step for several sequences of a many-session cache, in one call.

        inputs: i32[B] token ids or f32[B, d] hidden states; positions: i32[B] where
        each goes; slots: i32[B] distinct cache rows. Returns logits f32[B, vocab]
        (last range) or hidden f32[B, d], in the order given. The step runs a window of
        consecutive cache rows holding every slot, its width a power of two (few shapes
        are ever compiled); rows of the window not stepping write past the cache
        (dropped). Attention reads the positions up to the next power of two past the
        furthest.
        """
        count = len(slots)
        if count == 0 or len(inputs) != count or len(positions) != count or len(set(slots.tolist())) < count:
            raise InvalidRequestError("a step needs one input and one position for each of distinct slots")
        capacity, total = cache.capacity, cache.keys.shape[1]
        if int(np.max(positions)) >= capacity:
            raise ContextOverflowError(f"position {int(np.max(positions))} is past the cache of {capacity}")
        low = int(np.min(slots))
        rows, bound = self.step_shape(int(np.max(slots)) - low + 1, int(np.max(positions)), capacity, total)
        first = min(low, total - rows)
        offsets = np.asarray(slots) - first
        padded = np.zeros((rows, 1, *np.shape(inputs)[1:]), np.asarray(inputs).dtype)
        padded[offsets, 0] = inputs
        start = np.full(rows, capacity, np.int32)
        start[offsets] = positions
        out, cache = self._run(False, bound, padded, start, np.ones(rows, np.int32), cache, np.int32(first))
        out = _logits_rows(out)
        # Rows in window order are a view (no copy of 8 x vocab logits each step).
        in_order = offsets[0] == 0 and bool(np.all(np.diff(offsets) == 1))
        out = out[:count] if in_order else out[offsets]
        return (out if self.is_last else out[:, 0]), cache

    def step_shape(self, count: int, position: int, capacity: int, total: int) -> tuple[int, int]:
        """(rows, attention bound) of a step over `count` consecutive rows of a `total`-row
        cache, reaching `position` (the whole cache on the CPU kernels: see _kv_bound)."""
        rows = 1
        while rows < count:
            rows *= 2
        if self._whole_bound:
            return min(rows, total), capacity
        bound = MIN_CACHE
        while bound <= position:
            bound *= 2
        return min(rows, total), min(bound, capacity)

    def prepare_step(self, count: int, position: int, cache: KVCache) -> bool:
        """Compiles (without running) the step over `count` rows reaching `position` in
        `cache`; False if it was compiled already. Safe on another thread while steps
        run: a batch compiles the next attention bound before its sessions reach it."""
        rows, bound = self.step_shape(count, position, cache.capacity, cache.keys.shape[1])
        if self.is_first:  # a step of hidden states too (a peer's session among local ones)
            self._prologue((rows, 1), embeds=False)
        # The layers take what the prologue produces: its output shapes are their inputs'.
        produced = _abstract(self._prologue((rows, 1)).out_info)
        if self.is_first:
            inputs, rope = produced
        else:
            inputs, rope = jax.ShapeDtypeStruct((rows, 1, self.config.d_model), jnp.float32), produced
        return self._prepare_windowed(inputs, rope, bound, cache)

    def _prepare_windowed(self, inputs: Any, rope: Any, bound: int, cache: KVCache) -> bool:
        """Compiles the forward of `inputs` (f32[B, T, d] as a ShapeDtypeStruct) over a
        window of `cache`'s rows, as `_run` calls it; False if compiled already."""
        vector = jax.ShapeDtypeStruct((inputs.shape[0],), jnp.int32)
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        args = (self._weight_leaves, inputs, vector, vector, rope, _abstract(cache), scalar)
        if self._program_key(False, bound, args) in self._compiled:
            return False
        self._compiled_for(False, bound, args)
        return True

    def prepare_prefill(self, steps: int, cache: KVCache, rows: int = 1, end: int | None = None) -> bool:
        """Compiles (without running) a prompt chunk of `steps` token ids into one row of
        the many-session `cache` (`rows` consecutive rows: `forward_rows`), reaching
        position `end` (default: from position 0); False if compiled already (or not a
        first range). Safe on another thread while steps run, as prepare_step is: a
        batch compiles its chunk sizes ahead so that no request waits for them."""
        if not self.is_first:
            return False
        bound = self._kv_bound(steps if end is None else end, steps, cache.capacity)
        inputs, rope = _abstract(self._prologue((rows, steps)).out_info)
        return self._prepare_windowed(inputs, rope, bound, cache)

    def cache_rows(
        self, cache: KVCache, start: int, stop: int, slot: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of the keys and values of positions [start, stop) of cache row `slot`."""
        return np.asarray(cache.keys[:, slot, start:stop]), np.asarray(cache.values[:, slot, start:stop])

    def with_rows(self, cache: KVCache, keys: Rows, values: Rows, slot: int = 0) -> KVCache:
        """`cache` with positions [0, len) of row `slot` set to `keys`/`values` (a cached prefix):
        f[layers, len, ...] arrays, or sequences of them for consecutive positions (a prefix
        cache's blocks, joined here in the one copy that pads them).

        The cache is consumed (donated, updated in place). The rows pad with zeros to
        a power of two (fewer compiled shapes); the padding lands on positions the
        prompt's suffix overwrites before anything reads them.
        """
        keys_parts, values_parts = _parts(keys), _parts(values)
        count = sum(part.shape[1] for part in keys_parts)
        if count > cache.capacity:
            raise ContextOverflowError(f"{count} cached positions exceed the cache of {cache.capacity}")
        padded = 64
        while padded < count:
            padded *= 2
        padded = min(padded, cache.capacity)
        return _set_rows(
            cache,
            _joined(keys_parts, padded)[:, None],
            _joined(values_parts, padded)[:, None],
            jnp.int32(slot),
        )

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """A sentence embedding f32[d]: the mean of the final-normed hidden states, unit length.

        token_ids: i32[T]. Needs the whole model (first and last layers).
        """
        if not (self.is_first and self.is_last):
            raise InvalidRequestError("embeddings need an engine holding every layer")
        cache = self.new_cache(self.cache_capacity(len(token_ids)))
        hidden, _ = self.forward(np.asarray(token_ids, np.int32), 0, cache, hidden=True)
        # The head's own output norm, then the mean over positions.
        normed = model.rms_norm(jnp.asarray(hidden), self.weights.output_norm, self.config.rms_eps)
        pooled = np.mean(np.asarray(normed, np.float64), axis=0)
        return (pooled / max(np.linalg.norm(pooled), 1e-12)).astype(np.float32)
