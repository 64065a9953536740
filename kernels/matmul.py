"""Dequantize-matmul: `x @ dequant(w).T` with the weights decoded inside a Pallas kernel.

Owns the fused kernel that reads packed GGUF rows, decodes one tile of them per
step with the same decoders as `kernels.dequant` (through gathered byte loads),
and multiplies; and `dequant_matmul_reference`, its jnp twin.  GGUF rows are
output features, so the product contracts the last axes of x and the weight.

The kernel grid runs over (output-row tiles, activation-row tiles) with
`pl.cdiv`; a tail tile re-reads the last weight row instead of reading past the
buffer, and the wrapper slices the padding off.  Loads are gathers with
power-of-two shapes so the body stays within what Pallas' GPU backend lowers.

Imports only jax and numpy: never gguf, never swarm.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.dequant import decode_blocks
from kernels.qtensor import QuantTensor
from kernels.quant_types import quant_format

# Contract the last axis of both operands: x[m, k] . w[n, k] -> [m, n].
_CONTRACT_LAST = (((1,), (1,)), ((), ()))


def _iota(size: int) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, (size,), 0)


def _matmul_kernel(
    x_ref,  # f32[block_m, in_features]: this program's activation rows
    w_ref,  # u8[out_features, row_bytes]: every packed weight row
    o_ref,  # f32[block_m, block_rows]
    *,
    qtype: int,
    out_features: int,
    in_features: int,
    block_rows: int,
    block_k: int,
):
    fmt = quant_format(qtype)
    blocks_per_step = block_k // fmt.block_size
    row_blocks = in_features // fmt.block_size
    ragged = row_blocks % blocks_per_step != 0
    rows = jnp.minimum(pl.program_id(0) * block_rows + _iota(block_rows), out_features - 1)

    def step(index, acc):
        block = index * blocks_per_step + _iota(blocks_per_step)
        in_row = block < row_blocks
        block = jnp.minimum(block, row_blocks - 1)

        def field(offset: int, count: int) -> jax.Array:
            # u8[block_rows, blocks_per_step, count]: bytes offset.. of each block of the tile.
            cols = block[:, None] * fmt.block_bytes + offset + _iota(count)[None, :]
            return w_ref[rows[:, None, None], cols[None, :, :]]

        weights = decode_blocks(field, qtype)  # f32[block_rows, blocks_per_step, block_size]
        col = index * block_k + _iota(block_k)
        # Index both axes with arrays: the GPU lowering orders gathered axes first.
        x = x_ref[_iota(x_ref.shape[0])[:, None], jnp.minimum(col, in_features - 1)[None, :]]
        if ragged:
            weights = jnp.where(in_row[None, :, None], weights, 0.0)
            x = jnp.where((col < in_features)[None, :], x, 0.0)
        weights = weights.reshape(block_rows, block_k)
        return acc + lax.dot_general(
            x,
            weights,
            _CONTRACT_LAST,
            precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )

    steps = pl.cdiv(row_blocks, blocks_per_step)
    acc = jnp.zeros(o_ref.shape, jnp.float32)
    o_ref[...] = lax.fori_loop(0, steps, step, acc)


def _check_operands(x: jax.Array, w: QuantTensor) -> None:
    if not isinstance(w, QuantTensor):
        raise TypeError(f"w must be a QuantTensor; got {type(w).__name__}")
    if w.data.ndim != 2:
        raise ValueError(
            f"w must be one matrix with data u8[out, row_bytes]; got stacked data "
            f"{list(w.data.shape)} (index the layer first)"
        )
    if x.ndim != 2 or x.shape[1] != w.in_features:
        raise ValueError(
            f"x must be f32[m, {w.in_features}] for a weight of shape {w.shape}; got {list(x.shape)}"
        )


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@functools.partial(jax.jit, static_argnames=("block_rows", "block_m", "block_k", "interpret"))
def dequant_matmul(
    x: jax.Array,
    w: QuantTensor,
    *,
    block_rows: int = 64,
    block_m: int = 16,
    block_k: int = 256,
    interpret: bool = False,
) -> jax.Array:
    """`x @ dequant(w).T` for x: f32[m, k], w: QuantTensor of shape (n, k) -> f32[m, n].

    Tuning knobs (powers of two): `block_rows` output features per program,
    `block_m` activation rows per program, `block_k` input features decoded per
    inner step (a multiple of the type's block size).  Reads the ROWS layout (a
    PANELS weight is converted first).
    """
    _check_operands(x, w)
    w = w.to_rows()
    fmt = quant_format(w.qtype)
    for name, value in (("block_rows", block_rows), ("block_m", block_m), ("block_k", block_k)):
        if not _is_power_of_two(value):
            raise ValueError(f"{name} must be a power of two; got {value}")
    if block_k % fmt.block_size:
        raise ValueError(
            f"block_k ({block_k}) must be a multiple of the {fmt.name} block size ({fmt.block_size})"
        )
    m, k = x.shape
    n = w.out_features
    m_tiles, n_tiles = pl.cdiv(m, block_m), pl.cdiv(n, block_rows)
    x = jnp.pad(x.astype(jnp.float32), ((0, m_tiles * block_m - m), (0, 0)))
    kernel = functools.partial(
        _matmul_kernel,
        qtype=w.qtype,
        out_features=n,
        in_features=k,
        block_rows=block_rows,
        block_k=block_k,
    )
    out = pl.pallas_call(
        kernel,
        grid=(n_tiles, m_tiles),
        in_specs=[
            pl.BlockSpec((block_m, k), lambda i, j: (j, 0)),
            pl.BlockSpec(w.data.shape, lambda i, j: (0, 0)),
        ],
        out_specs=pl.BlockSpec((block_m, block_rows), lambda i, j: (j, i)),
        out_shape=jax.ShapeDtypeStruct((m_tiles * block_m, n_tiles * block_rows), jnp.float32),
        interpret=interpret,
        name=f"dequant_matmul_{fmt.name.lower()}",
    )(x, w.data)
    return out[:m, :n]


@jax.jit
def dequant_matmul_reference(x: jax.Array, w: QuantTensor) -> jax.Array:
    """jnp reference: x f32[m, k] times the dequantized w (n, k), transposed -> f32[m, n]."""
    _check_operands(x, w)
    return lax.dot_general(
        x.astype(jnp.float32),
        w.dequantize(),
        _CONTRACT_LAST,
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
