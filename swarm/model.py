"""Transformer math for one layer range, as pure functions over pytrees.

Owns the forward pass of a contiguous layer range [first, last): token embedding when
the range starts at layer 0, the decoder layers, and output norm plus head when it ends
at the last layer. Layers of one shape run under one `lax.scan`, so compile time does
not grow with the layer count. Every matmul and attention call goes through
`kernels.ops`; this module never branches on quantization or on an architecture name,
only on `ModelConfig` fields.

Pure: no I/O, no logging, no environment reads. Conventions follow llama.cpp's graph
builders (`llm_build_llama`, `llm_build_qwen2`, `llm_build_gemma3_iswa`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from kernels import ops
from swarm.model_config import ModelConfig

Params = dict[str, Any]


@jax.tree_util.register_dataclass
@dataclass
class LayerGroup:
    """Consecutive layers whose weights have identical shapes and types, stacked.

    `params` leaves have a leading axis of length `count`; `window` holds each
    layer's attention window (NO_WINDOW for global layers) and `rope_table` which
    of the range's rotary tables (`RangeWeights.rope_theta_scale`) it uses.
    """

    params: Params
    window: jax.Array  # i32[count]
    rope_table: jax.Array  # i32[count]
    offset: int = field(metadata={"static": True})  # index of its first layer within the range
    count: int = field(metadata={"static": True})


@jax.tree_util.register_dataclass
@dataclass
class RangeWeights:
    """Weights a layer range needs: embedding only when first, head only when last."""

    groups: list[LayerGroup]
    embedding: Any | None  # f32[vocab, d] or QuantTensor, when the range starts at 0
    output_norm: jax.Array | None  # f32[d], when the range ends at the last layer
    output: Any | None  # f32[vocab, d] or QuantTensor (the embedding when tied)
    # One rotary table per distinct (base, scale) among the range's layers:
    # theta_scale = powf(base, -2/dims) as ggml computes it, and the position scale.
    rope_theta_scale: jax.Array  # f32[tables]
    rope_freq_scale: jax.Array  # f32[tables]


@jax.tree_util.register_dataclass
@dataclass
class KVCache:
    """Keys and values of the range's layers for a batch of sequences.

    Slot j of a sequence holds the key of absolute position j.
    """

    keys: jax.Array  # f32 or f16[layers, batch, capacity, n_kv_heads, head_dim]
    values: jax.Array  # f32 or f16[layers, batch, capacity, n_kv_heads, value_dim]

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[2])


def new_cache(config: ModelConfig, n_layers: int, batch: int, capacity: int, dtype=jnp.float32) -> KVCache:
    """An empty cache; f16 halves its memory and multiplies as ggml's f16 cache does."""
    shape = (n_layers, batch, capacity, config.n_kv_heads)
    return KVCache(
        keys=jnp.zeros((*shape, config.head_dim), dtype),
        values=jnp.zeros((*shape, config.value_dim), dtype),
    )


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """ggml_rms_norm followed by the weight multiply; x: f32[..., d], weight: f32[d]."""
    return ops.rms_norm(x, weight, eps)


def rope_tables(
    positions: jax.Array, theta_scale: jax.Array, freq_scale: jax.Array, config: ModelConfig
) -> tuple[jax.Array, jax.Array]:
    """cos and sin f32[tables, B, T, dims/2] of every rotary table for positions i32[B, T].

    theta_i = pos * theta_scale^i built by repeated multiplication in f32, exactly as
    ggml_rope_cache_init does, so angles round the same way llama.cpp's do.

    The engine runs this as a program of its own and hands the tables to the layers:
    traced with them, XLA fuses the sines and cosines into every layer's rotation and
    evaluates them there again for each element it rotates, which costs more than the
    rotation itself.
    """
    theta = positions.astype(jnp.float32)[None] * jnp.ones_like(theta_scale)[:, None, None]
    scale = theta_scale[:, None, None]
    thetas = [theta]
    for _ in range(config.rope_dims // 2 - 1):
        thetas.append(thetas[-1] * scale)
    angles = jnp.stack(thetas, axis=-1) * freq_scale[:, None, None, None]
    return jnp.cos(angles), jnp.sin(angles)


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array, config: ModelConfig) -> jax.Array:
    """Rotary embedding on the first `rope_dims` features of each head (ggml_rope_ext).

    x: f32[B, T, H, D]; cos, sin: f32[B, T, dims/2]. "norm" rotates the pairs
    (2i, 2i+1), "neox" the pairs (i, i + dims/2).
    """
    dims = config.rope_dims
    half = dims // 2
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    rotated, rest = x[..., :dims], x[..., dims:]
    if config.rope_style == "norm":
        pairs = rotated.reshape(*rotated.shape[:-1], half, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(rotated.shape)
    else:
        a, b = rotated[..., :half], rotated[..., half:]
        out = jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return jnp.concatenate([out, rest], axis=-1) if dims < x.shape[-1] else out


def _layer(
    config: ModelConfig,
    params: Params,
    hidden: jax.Array,
    positions: jax.Array,
    kv_length: jax.Array,
    cache: KVCache,
    layer: jax.Array,
    window: jax.Array,
    rope_angles: tuple[jax.Array, jax.Array, jax.Array],
    kv_bound: int,
    first_row: jax.Array | None,
) -> tuple[jax.Array, KVCache]:
    """One decoder layer. hidden: f32[B, T, d]; positions: i32[B, T]; kv_length: i32[B].

    rope_angles: cos and sin of every rotary table (`rope_tables`) and the layer's table
    (i32[]). first_row: i32[], batch row b is cache row first_row + b (None: cache row b).
    """
    batch, steps, _ = hidden.shape
    normed = rms_norm(hidden, params["attn_norm"], config.rms_eps)
    q, k, v = ops.matmuls(normed, [params["wq"], params["wk"], params["wv"]])
    if config.qkv_bias:
        q, k, v = q + params["bq"], k + params["bk"], v + params["bv"]
    q = q.reshape(batch, steps, config.n_heads, config.head_dim)
    k = k.reshape(batch, steps, config.n_kv_heads, config.head_dim)
    v = v.reshape(batch, steps, config.n_kv_heads, config.value_dim)
    if config.qk_norm:
        q = rms_norm(q, params["q_norm"], config.rms_eps)
        k = rms_norm(k, params["k_norm"], config.rms_eps)
    # Write this step's keys and values at their positions; padded steps past the
    # capacity are dropped, padded steps inside it are overwritten later and masked
    # by kv_length meanwhile. Attention reads only these sequences' rows, up to the bound
    # (a window of a many-session cache).
    base = jnp.int32(0) if first_row is None else first_row
    if ops.attention_writes_cache():
        # One kernel call rotates, writes and attends (XLA would run a rotation, a
        # conversion and two scatters around the attention call, each step and layer).
        attended, keys, values = ops.cache_write_attention(
            q,
            k,
            v,
            *rope_angles,
            cache.keys,
            cache.values,
            layer,
            base,
            positions,
            kv_length,
            rope_style=config.rope_style,
            kv_bound=kv_bound,
            scale=config.attention_scale,
            sliding_window=window,
        )
    else:
        cos_tables, sin_tables, table = rope_angles
        cos, sin = cos_tables[table], sin_tables[table]
        q = rope(q, cos, sin, config)
        k = rope(k, cos, sin, config)
        rows = (base + jnp.arange(batch, dtype=jnp.int32))[:, None]
        keys = cache.keys.at[layer, rows, positions].set(k.astype(cache.keys.dtype), mode="drop")
        values = cache.values.at[layer, rows, positions].set(v.astype(cache.values.dtype), mode="drop")
        attended = ops.cache_attention(
            q,
            keys,
            values,
            layer,
            base,
            positions,
            kv_length,
            kv_bound=kv_bound,
            scale=config.attention_scale,
            sliding_window=window,
        )
    attended = attended.reshape(batch, steps, -1)
    if config.post_norms:
        attn_out = ops.matmul(attended, params["wo"])
        hidden = hidden + rms_norm(attn_out, params["post_attn_norm"], config.rms_eps)
    else:
        hidden = ops.matmul(attended, params["wo"], add=hidden)  # the residual, added as stored

    normed = rms_norm(hidden, params["ffn_norm"], config.rms_eps)
    gate, up = ops.matmuls(normed, [params["w_gate"], params["w_up"]])
    gated = ops.gated(config.activation, gate, up)
    if config.post_norms:
        ffn_out = rms_norm(ops.matmul(gated, params["w_down"]), params["post_ffn_norm"], config.rms_eps)
        return hidden + ffn_out, KVCache(keys, values)
    return ops.matmul(gated, params["w_down"], add=hidden), KVCache(keys, values)


def embed(config: ModelConfig, table: Any, token_ids: jax.Array) -> jax.Array:
    """token_ids: i32[...] -> f32[..., d] rows of the embedding table (scaled by sqrt(d) for Gemma).

    Run as a program of its own, by the first range and by a requester embedding for a
    pipeline alike: XLA contracts a multiply into a following add (FMA) differently
    depending on what it fuses with, so the layers must start from the same rounded
    rows whichever side embedded them, for a split to give one engine's tokens.
    """
    rows = ops.take_rows(table, token_ids)
    return rows * jnp.float32(config.embedding_scale) if config.embedding_scale != 1.0 else rows


def run_layers(
    config: ModelConfig,
    weights: RangeWeights,
    hidden: jax.Array,
    positions: jax.Array,
    kv_length: jax.Array,
    cache: KVCache,
    rope: tuple[jax.Array, jax.Array],
    kv_bound: int | None = None,
    first_row: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]:
    """Every layer of the range over hidden: f32[B, T, d]; rope: `rope_tables` of the positions.

    Attention reads cache positions [0, kv_bound) only (default: all): a static bound
    that covers every visible key saves the work of scoring empty positions. With
    `first_row` (i32[]), batch row b reads and writes cache row first_row + b: a window
    of a shared many-session cache's sequences steps together, or one of them alone.
    """
    kv_bound = cache.capacity if kv_bound is None else min(kv_bound, cache.capacity)
    cos_tables, sin_tables = rope
    for group in weights.groups:

        def body(carry: tuple[jax.Array, KVCache], xs: tuple[Any, ...], group: LayerGroup = group):
            hidden, cache = carry
            params, index, window, table = xs
            hidden, cache = _layer(
                config,
                params,
                hidden,
                positions,
                kv_length,
                cache,
                index,
                window,
                (cos_tables, sin_tables, table),
                kv_bound,
                first_row,
            )
            return (hidden, cache), None

        indices = group.offset + jnp.arange(group.count)
        xs = (group.params, indices, group.window, group.rope_table)
        if group.count == 1:
            # A lone layer runs inline: XLA on CPU copies each layer's weights out of
            # a stacked array inside a loop, so unrolled layers stream them faster.
            (hidden, cache), _ = body((hidden, cache), jax.tree.map(lambda leaf: leaf[0], xs))
        else:
            (hidden, cache), _ = jax.lax.scan(body, (hidden, cache), xs)
    return hidden, cache


def head(config: ModelConfig, weights: RangeWeights, hidden: jax.Array) -> jax.Array:
    """Output norm and projection to the vocabulary: f32[..., d] -> f32[..., vocab]."""
    normed = rms_norm(hidden, weights.output_norm, config.rms_eps)
    return ops.matmul(normed, weights.output)
