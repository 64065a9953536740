"""The one entry point model code uses for weight products, attention, RMS norms and
gated activations.

Owns the choice of implementation: `impl="auto"` picks, at trace time from
`jax.default_backend()`, the Pallas kernels on GPU; on CPU, the packed-weight
custom call of `kernels.cpu` for `QuantTensor`s of the types it supports (when it
could be built), and the jnp references otherwise (the kernels' gathered loads
target Pallas' GPU backend, not TPU's).  "reference", "pallas",
"pallas_interpret" and "cpu" force a path; "cpu" still sends the types it does
not support to the reference.  Layer code passes plain arrays and `QuantTensor`s
alike and never branches on quantization.

Imports only jax and numpy: never gguf, never swarm.  Reads no environment.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax import lax

from kernels import cpu
from kernels.attention import attention as pallas_attention
from kernels.attention import attention_reference, window_array
from kernels.matmul import dequant_matmul
from kernels.norm import rms_norm_reference
from kernels.qtensor import QuantTensor

IMPLS = ("auto", "reference", "pallas", "pallas_interpret", "cpu")


# What "auto" means while tracing inside `implementation(...)`: None is the default choice.
_chosen: contextvars.ContextVar[str | None] = contextvars.ContextVar("kernels_impl", default=None)


@contextlib.contextmanager
def implementation(impl: str) -> Iterator[None]:
    """Within this block (while tracing), `impl="auto"` means `impl`: an engine built to
    compute exactly as the reference does traces its forward inside `implementation("reference")`."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    token = _chosen.set(None if impl == "auto" else impl)
    try:
        yield
    finally:
        _chosen.reset(token)


def _resolve(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    if impl == "auto":
        impl = _chosen.get() or "auto"
    if impl == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "reference"
    return impl


def attention_reads_visible_keys(impl: str = "auto") -> bool:
    """Whether cache attention under `impl` reads only the keys each query sees, whatever
    its static bound (the CPU kernel path): a wider bound then costs nothing, and one
    compiled bound serves every position."""
    return _cpu_attention(impl)


def _cpu_attention(impl: str) -> bool:
    """Whether attention under `impl` ("auto" meaning what `implementation` chose) runs
    on the `kernels.cpu` calls, which read and write the cache in place."""
    if impl == "auto":
        impl = _chosen.get() or "auto"
    return _use_cpu_kernels(impl)


def _use_cpu_kernels(impl: str) -> bool:
    """Whether `impl` runs its packed products on the `kernels.cpu` custom call: "cpu"
    (raising if it could not be built), or "auto" on the CPU backend where it could."""
    if impl == "cpu":
        if not cpu.available():
            raise RuntimeError(cpu.unavailable_reason())
        return True
    return impl == "auto" and jax.default_backend() == "cpu" and cpu.available()


def _use_cpu_fused(impl: str) -> bool:
    """Whether `impl` runs RMS norms and SwiGLU on the `kernels.cpu` custom calls too:
    where the products do and the CPU has the AVX-512 build, which holds them (elsewhere
    they run in jnp beside the portable matmul and attention)."""
    return _use_cpu_kernels(impl) and cpu.fused_available()


def _use_cpu_kernel(impl: str, w: QuantTensor) -> bool:
    """Whether `impl` sends this packed weight to the `kernels.cpu` custom call."""
    return _use_cpu_kernels(impl) and cpu.supports(w.qtype)


def arrange(w: jax.Array | QuantTensor, *, impl: str = "auto") -> jax.Array | QuantTensor:
    """`w` in the byte layout the path `impl` reads fastest, for holding between calls.

    The CPU kernel streams the PANELS layout at memory speed, so weights it will
    run on are permuted once here, at load time; every other path and weight is
    returned as it is.  Any layout gives the same products on every path.
    """
    if (
        isinstance(w, QuantTensor)
        and _use_cpu_kernel(impl, w)
        and cpu.panels_available()
        and w.can_use_panels()
    ):
        return w.to_panels()
    return w


def _dot_last(x: jax.Array, w: jax.Array) -> jax.Array:
    """x f32[..., in] . w f32[out, in] -> f32[..., out] (GGUF rows are output features)."""
    return lax.dot_general(
        x,
        w,
        (((x.ndim - 1,), (1,)), ((), ())),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )


def matmul(
    x: jax.Array, w: jax.Array | QuantTensor, *, add: jax.Array | None = None, impl: str = "auto"
) -> jax.Array:
    """Linear layer without bias: x f32[..., in] times w of shape (out, in) -> f32[..., out],
    plus `add` f32[..., out] when given (a residual connection).

    `w` is either a plain f32[out, in] array (always an XLA dot) or a
    `QuantTensor` (dequantized by the path `impl` selects). The CPU kernel adds `add`
    as it stores each product, saving a pass over memory; the sums are the same f32
    values as adding afterwards, which every other path does.
    """
    if impl == "auto":
        impl = _chosen.get() or "auto"
    path = _resolve(impl)
    x = jnp.asarray(x, jnp.float32)
    if isinstance(w, QuantTensor):
        _check_fits(x, w)
        if _use_cpu_kernel(impl, w):
            return _cpu_products(x, [w], None if add is None else [add])[0]
        if path in ("reference", "cpu"):
            out = _dot_last(x, w.dequantize())
        else:
            flat = x.reshape(-1, w.in_features)
            out = dequant_matmul(flat, w, interpret=path == "pallas_interpret")
            out = out.reshape(*x.shape[:-1], w.out_features)
        return out if add is None else out + add
    w = jnp.asarray(w)
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"x [..., in] {list(x.shape)} does not fit a weight f32[out, in] {list(w.shape)}")
    out = _dot_last(x, w.astype(jnp.float32))
    return out if add is None else out + add


def _check_fits(x: jax.Array, w: QuantTensor) -> None:
    if w.data.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.in_features:
        raise ValueError(
            f"x [..., in] {list(x.shape)} does not fit a single weight of shape {w.shape} "
            f"(data {list(w.data.shape)})"
        )


def _cpu_products(
    x: jax.Array, ws: list[QuantTensor], adds: list[jax.Array] | None = None
) -> list[jax.Array]:
    """x f32[..., in] times each of `ws` (plus adds[j]) in one `kernels.cpu` call (leading
    axes flattened)."""
    flat = x.reshape(-1, ws[0].in_features)
    flat_adds = None
    if adds is not None:
        flat_adds = [
            jnp.broadcast_to(jnp.asarray(a, jnp.float32), (*x.shape[:-1], w.out_features)).reshape(
                flat.shape[0], w.out_features
            )
            for w, a in zip(ws, adds, strict=True)
        ]
    products = cpu.qmatmuls(flat, ws, flat_adds)
    return [out.reshape(*x.shape[:-1], w.out_features) for w, out in zip(ws, products, strict=True)]


def matmuls(x: jax.Array, ws: list[jax.Array | QuantTensor], *, impl: str = "auto") -> list[jax.Array]:
    """`matmul(x, w)` for each w of `ws`, the same values: on the CPU kernel path, runs of
    consecutive weights of one type and layout (a layer's q, k and v) go in one call
    that quantizes x once; every other path multiplies them one by one."""
    if impl == "auto":
        impl = _chosen.get() or "auto"
    x = jnp.asarray(x, jnp.float32)
    outputs: list[jax.Array] = []
    index = 0
    while index < len(ws):
        run = 1
        if isinstance(ws[index], QuantTensor) and _use_cpu_kernel(impl, ws[index]):
            while index + run < len(ws) and cpu.can_share_call(ws[index : index + run + 1]):
                run += 1
        if run == 1:
            outputs.append(matmul(x, ws[index], impl=impl))
        else:
            group = ws[index : index + run]
            for w in group:
                _check_fits(x, w)
            outputs.extend(_cpu_products(x, group))
        index += run
    return outputs


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    kv_length: jax.Array,
    *,
    scale: float,
    sliding_window: int | jax.Array | None = None,
    logit_softcap: float | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Attention over a KV cache; see `kernels.attention` for the exact masking rule.

    q f32[B, T, Hq, D], k/v f32[B, S, Hkv, D], q_positions i32[B, T], kv_length i32[B]
    -> f32[B, T, Hq, D].
    """
    path = _resolve(impl)
    options = dict(scale=scale, sliding_window=sliding_window, logit_softcap=logit_softcap)
    if path in ("reference", "cpu"):
        return attention_reference(q, k, v, q_positions, kv_length, **options)
    return pallas_attention(q, k, v, q_positions, kv_length, interpret=path == "pallas_interpret", **options)


def cache_attention(
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    layer: jax.Array,
    first_row: jax.Array,
    q_positions: jax.Array,
    kv_length: jax.Array,
    *,
    kv_bound: int,
    scale: float,
    sliding_window: int | jax.Array | None = None,
    logit_softcap: float | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Attention of q f32[B, T, Hq, D] over rows [first_row, first_row + B) of layer
    `layer` of a whole cache keys/values [L, R, C, Hkv, D], positions [0, kv_bound).

    On the CPU kernel path, decode steps and prompt chunks alike read the visible keys
    in place (`kernels.cpu.cache_attention`); every other path slices the window out
    and calls `attention`. Rows whose position is past the cache (padding whose write
    was dropped) get unspecified values.
    """
    if impl == "auto":
        impl = _chosen.get() or "auto"
    if _use_cpu_kernels(impl):
        return cpu.cache_attention(
            q,
            keys,
            values,
            layer,
            first_row,
            window_array(sliding_window)[0],
            q_positions,
            kv_length,
            scale=scale,
            logit_softcap=logit_softcap,
            bound=kv_bound,
        )
    batch = q.shape[0]
    zero = jnp.int32(0)
    origin = (jnp.asarray(layer, jnp.int32), jnp.asarray(first_row, jnp.int32), zero, zero, zero)
    window_keys = lax.dynamic_slice(keys, origin, (1, batch, kv_bound, *keys.shape[3:]))[0]
    window_values = lax.dynamic_slice(values, origin, (1, batch, kv_bound, *values.shape[3:]))[0]
    return attention(
        q,
        window_keys,
        window_values,
        q_positions,
        kv_length,
        scale=scale,
        sliding_window=sliding_window,
        logit_softcap=logit_softcap,
        impl=impl,
    )


def attention_writes_cache(impl: str = "auto") -> bool:
    """Whether `cache_write_attention` runs under `impl` (the CPU kernel path): there one
    call rotates a layer's step, writes it into the cache and attends; elsewhere the
    caller rotates, writes and calls `cache_attention`."""
    return _cpu_attention(impl)


def cache_write_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    table: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    layer: jax.Array,
    first_row: jax.Array,
    q_positions: jax.Array,
    kv_length: jax.Array,
    *,
    rope_style: str,
    kv_bound: int,
    scale: float,
    sliding_window: int | jax.Array | None = None,
    logit_softcap: float | None = None,
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The rotary embedding of q and k (before it: f32[B, T, H, D]; angles: table `table`
    of cos, sin f32[tables, B, T, dims / 2], pairs (2i, 2i + 1) for rope_style "norm",
    (i, i + dims / 2) for "neox"), k and v written at q_positions of cache rows
    first_row + b of `layer`, then `cache_attention` of the rotated q: (out, keys,
    values), the caches updated in place.

    Only where `attention_writes_cache(impl)` (`kernels.cpu.cache_write_attention`).
    """
    if impl == "auto":
        impl = _chosen.get() or "auto"
    if not _use_cpu_kernels(impl):
        raise ValueError(
            f"cache_write_attention runs on the CPU kernel path only; impl {impl!r} does not take it"
        )
    if rope_style not in ("norm", "neox"):
        raise ValueError(f"rope_style must be 'norm' or 'neox'; got {rope_style!r}")
    return cpu.cache_write_attention(
        q,
        k,
        v,
        cos,
        sin,
        table,
        keys,
        values,
        layer,
        first_row,
        window_array(sliding_window)[0],
        q_positions,
        kv_length,
        neox=rope_style == "neox",
        scale=scale,
        logit_softcap=logit_softcap,
        bound=kv_bound,
    )


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, *, impl: str = "auto") -> jax.Array:
    """RMS norm of each row of x f32[..., d], times weight f32[d] (ggml_rms_norm then ggml_mul).

    On the CPU kernel path, llama.cpp's own arithmetic (f64 sum of the squares,
    `kernels.cpu.rms_norm`); every other path the jnp reference, whose halving f32 sum
    differs from it in the last bit. Either way each row depends on itself only.
    """
    if impl == "auto":
        impl = _chosen.get() or "auto"
    x = jnp.asarray(x, jnp.float32)
    weight = jnp.asarray(weight, jnp.float32)
    if _use_cpu_fused(impl):
        return cpu.rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def greedy_tokens(logits: jax.Array, *, impl: str = "auto") -> jax.Array | None:
    """i32[...]: each row of logits f32[..., v]'s greedy token, found in the program that
    made them, on the CPU kernel path (`kernels.cpu.argmax`, numpy's argmax: the first index
    of the largest value, or of the first NaN); None elsewhere, where the host finds it."""
    if impl == "auto":
        impl = _chosen.get() or "auto"
    if _use_cpu_fused(impl):
        return cpu.argmax(logits)
    return None


def gated(activation: str, gate: jax.Array, up: jax.Array, *, impl: str = "auto") -> jax.Array:
    """A gated feed-forward's hidden values, activation(gate) * up, for f32[..., n] arrays.

    `activation` is "silu" or "gelu_tanh". On the CPU kernel path SiLU is llama.cpp's own
    arithmetic (`kernels.cpu.swiglu`); GELU and every other path run in jnp.
    """
    if impl == "auto":
        impl = _chosen.get() or "auto"
    gate = jnp.asarray(gate, jnp.float32)
    up = jnp.asarray(up, jnp.float32)
    if activation == "silu":
        if _use_cpu_fused(impl):
            return cpu.swiglu(gate, up)
        return jax.nn.silu(gate) * up
    if activation == "gelu_tanh":
        return jax.nn.gelu(gate, approximate=True) * up
    raise ValueError(f"unknown activation {activation!r} (silu or gelu_tanh)")


def take_rows(table: jax.Array | QuantTensor, ids: jax.Array) -> jax.Array:
    """Embedding lookup: rows `ids` (i32[...]) of a table shaped (rows, width) -> f32[..., width].

    A packed table is gathered while still packed, then only those rows are
    dequantized, so the lookup never materializes the whole table in f32.
    """
    if isinstance(table, QuantTensor):
        picked = table.take(ids.reshape(-1)).dequantize()
        return picked.reshape(*ids.shape, table.in_features)
    return jnp.take(jnp.asarray(table, jnp.float32), ids, axis=0)
