"""RMS norm in jnp: the reference the CPU kernel (kernels/cpu/norm.cc) is tested against,
and the path every other backend takes through `kernels.ops.rms_norm`.

Imports only jax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _row_sum(x: jax.Array) -> jax.Array:
    """Sum over the last axis by halving it (zero-padded to a power of two): every row
    is summed by the same elementwise adds, whatever the other axes hold.

    XLA picks its reduction loops by shape, so a row's `jnp.sum` can round differently
    in a batch of 8 than alone; with 8-bit activation rounding downstream that last-bit
    difference can change a greedy token. Summed this way a sequence gets the same
    tokens whichever requests share its decode step.
    """
    width = x.shape[-1]
    padded = 1 << max(0, (width - 1).bit_length())
    if padded != width:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, padded - width)])
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x


def rms_norm_reference(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """ggml_rms_norm followed by the weight multiply, in f32; x: f32[..., d], weight: f32[d]."""
    variance = _row_sum(x * x) / jnp.float32(x.shape[-1])
    return x * jax.lax.rsqrt(variance + eps) * weight
