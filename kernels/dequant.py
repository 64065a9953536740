"""Reference dequantization of packed GGML blocks, in pure jax.numpy.

Owns the bit layouts of every format in `quant_types.FORMATS`, following the
`dequantize_row_*` functions of ggml-quants.c.  Each format is one decoder over a
*byte field accessor*: `field(offset, count)` returns bytes `[offset, offset+count)`
of every block as `u8[..., count]`.  The jnp path reads fields with static slices;
the Pallas matmul kernel reads them with gathered loads from its weight tile, so
both run the same decoding math.  Decoders use only elementwise integer ops,
broadcasts, reshapes and same-width bitcasts, with power-of-two field sizes, so
that they stay lowerable by Pallas' GPU backend.

Imports only jax and numpy: never gguf, never swarm.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from kernels.quant_types import QK_K, GGMLType, quant_format, row_bytes

ByteField = Callable[[int, int], jax.Array]
"""field(offset, count) -> u8[..., count]: the same bytes of every block."""


def _shifts(count: int, step: int) -> jax.Array:
    """u8[count, 1] holding 0, step, 2*step, ...; built from iota (no captured constants)."""
    return (lax.broadcasted_iota(jnp.int32, (count, 1), 0) * step).astype(jnp.uint8)


def _split_outer(packed: jax.Array, bits: int) -> jax.Array:
    """u8[..., L] -> u8[..., 8 // bits, L]: bit group g of every byte, g on the outer axis."""
    return (packed[..., None, :] >> _shifts(8 // bits, bits)) & ((1 << bits) - 1)


def _split_inner(packed: jax.Array, bits: int) -> jax.Array:
    """u8[..., L] -> u8[..., L, 8 // bits]: bit group g of every byte, g on the inner axis."""
    return (packed[..., :, None] >> _shifts(8 // bits, bits).reshape(1, -1)) & ((1 << bits) - 1)


def _merge_last(x: jax.Array, count: int) -> jax.Array:
    """Merge the last `count` axes into one (row-major, as the ggml loops walk them)."""
    return x.reshape(*x.shape[:-count], -1)


def _u16(field: ByteField, offset: int) -> jax.Array:
    """Little-endian u16 at `offset` as u16[..., 1] (ggml stores fp16/bf16 this way)."""
    lo = field(offset, 1).astype(jnp.uint16)
    hi = field(offset + 1, 1).astype(jnp.uint16)
    return lo | (hi << 8)


def _f16(field: ByteField, offset: int) -> jax.Array:
    """`ggml_fp16_t` at `offset` (GGML_FP16_TO_FP32) as f32[..., 1]."""
    return lax.bitcast_convert_type(_u16(field, offset), jnp.float16).astype(jnp.float32)


def _i8(x: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(x, jnp.int8).astype(jnp.float32)


def _f32_elem(field: ByteField) -> jax.Array:
    word = _u16(field, 0).astype(jnp.uint32) | (_u16(field, 2).astype(jnp.uint32) << 16)
    return lax.bitcast_convert_type(word, jnp.float32)


def _f16_elem(field: ByteField) -> jax.Array:
    return _f16(field, 0)


def _bf16_elem(field: ByteField) -> jax.Array:
    # ggml_compute_bf16_to_fp32: the bf16 bits are the top half of an f32.
    return lax.bitcast_convert_type(_u16(field, 0).astype(jnp.uint32) << 16, jnp.float32)


def _q4_0(field: ByteField) -> jax.Array:
    # dequantize_row_q4_0: y[j] = (lo(qs[j]) - 8) * d, y[j + 16] = (hi(qs[j]) - 8) * d.
    q = _merge_last(_split_outer(field(2, 16), 4), 2)
    return _f16(field, 0) * (q.astype(jnp.float32) - 8.0)


def _q4_1(field: ByteField) -> jax.Array:
    # dequantize_row_q4_1: y = q * d + m.
    q = _merge_last(_split_outer(field(4, 16), 4), 2)
    return _f16(field, 0) * q.astype(jnp.float32) + _f16(field, 2)


def _q5_high(field: ByteField, offset: int) -> jax.Array:
    """Fifth bits of a Q5_0/Q5_1 block: bit j of the little-endian u32 `qh` is element j's."""
    return _merge_last(_split_inner(field(offset, 4), 1), 2) << 4


def _q5_0(field: ByteField) -> jax.Array:
    # dequantize_row_q5_0: x = (lo | (bit << 4)) - 16; y = x * d.
    q = _merge_last(_split_outer(field(6, 16), 4), 2) | _q5_high(field, 2)
    return _f16(field, 0) * (q.astype(jnp.float32) - 16.0)


def _q5_1(field: ByteField) -> jax.Array:
    # dequantize_row_q5_1: y = (lo | (bit << 4)) * d + m.
    q = _merge_last(_split_outer(field(8, 16), 4), 2) | _q5_high(field, 4)
    return _f16(field, 0) * q.astype(jnp.float32) + _f16(field, 2)


def _q8_0(field: ByteField) -> jax.Array:
    # dequantize_row_q8_0: y = qs[j] * d with signed qs.
    return _f16(field, 0) * _i8(field(2, 32))


def _q2_k(field: ByteField) -> jax.Array:
    # dequantize_row_q2_K: two halves of 128; in each, bit pair j of qs[32 * half + l]
    # is element 128 * half + 32 * j + l, scaled by scales[8 * half + 2 * j + l // 16].
    scales = field(0, 16)[..., None]
    qs = field(16, 64)
    q = _split_outer(qs.reshape(*qs.shape[:-1], 2, 32), 2)  # [..., half, j, l]
    q = q.reshape(*qs.shape[:-1], 16, 16).astype(jnp.float32)
    d = _f16(field, 80)[..., None] * (scales & 0xF).astype(jnp.float32)
    m = _f16(field, 82)[..., None] * (scales >> 4).astype(jnp.float32)
    return _merge_last(d * q - m, 2)


def _q3_k(field: ByteField) -> jax.Array:
    # dequantize_row_q3_K.  6-bit scales: low nibbles in bytes 0..7 (scale 8 * nibble +
    # byte), high bit pairs in bytes 8..11 (scale 4 * pair + byte), offset by 32.
    low = _merge_last(_split_outer(field(96, 8), 4), 2)
    high = _merge_last(_split_outer(field(104, 4), 2), 2)
    scales = ((low | (high << 4)).astype(jnp.int32) - 32).astype(jnp.float32)
    # Element 128 * half + 32 * j + l: low bits are bit pair j of qs[32 * half + l];
    # hmask bit (4 * half + j) of hmask[l] clear means "subtract 4".
    qs = field(32, 64)
    low_bits = _split_outer(qs.reshape(*qs.shape[:-1], 2, 32), 2)
    high_bits = _split_outer(field(0, 32), 1)
    q = low_bits.reshape(*qs.shape[:-1], 16, 16).astype(jnp.int32) - 4 * (
        1 - high_bits.reshape(*qs.shape[:-1], 16, 16).astype(jnp.int32)
    )
    d = _f16(field, 108)[..., None] * scales[..., None]
    return _merge_last(d * q.astype(jnp.float32), 2)


def _k4_scales(field: ByteField, offset: int) -> tuple[jax.Array, jax.Array]:
    """get_scale_min_k4 for j = 0..7 of a Q4_K/Q5_K block: (scale, min) as f32[..., 8, 1]."""
    a = field(offset, 4)[..., None, :]  # bytes 0..3: low 6 bits of scales 0..3
    b = field(offset + 4, 4)[..., None, :]  # bytes 4..7: low 6 bits of mins 0..3
    c = field(offset + 8, 4)[..., None, :]  # bytes 8..11: low nibbles of scales/mins 4..7
    upper = lax.broadcasted_iota(jnp.int32, (2, 1), 0) == 1  # j >= 4
    scale = jnp.where(upper, (c & 0xF) | ((a >> 6) << 4), a & 63)
    minimum = jnp.where(upper, (c >> 4) | ((b >> 6) << 4), b & 63)
    return (
        _merge_last(scale, 2)[..., None].astype(jnp.float32),
        _merge_last(minimum, 2)[..., None].astype(jnp.float32),
    )


def _q4_k(field: ByteField) -> jax.Array:
    # dequantize_row_q4_K: sub-block 2 * c + nibble holds nibble of qs[32 * c + l].
    scale, minimum = _k4_scales(field, 4)
    qs = field(16, 128)
    q = _split_outer(qs.reshape(*qs.shape[:-1], 4, 32), 4)
    q = q.reshape(*qs.shape[:-1], 8, 32).astype(jnp.float32)
    d = _f16(field, 0)[..., None] * scale
    m = _f16(field, 2)[..., None] * minimum
    return _merge_last(d * q - m, 2)


def _q5_k(field: ByteField) -> jax.Array:
    # dequantize_row_q5_K: as Q4_K, plus bit `sub` of qh[l] as the fifth bit.
    scale, minimum = _k4_scales(field, 4)
    qs = field(48, 128)
    low = _split_outer(qs.reshape(*qs.shape[:-1], 4, 32), 4).reshape(*qs.shape[:-1], 8, 32)
    high = _split_outer(field(16, 32), 1)  # [..., 8, 32]
    q = (low | (high << 4)).astype(jnp.float32)
    d = _f16(field, 0)[..., None] * scale
    m = _f16(field, 2)[..., None] * minimum
    return _merge_last(d * q - m, 2)


def _q6_k(field: ByteField) -> jax.Array:
    # dequantize_row_q6_K: element 128 * half + 32 * p + l takes the nibble p // 2 of
    # ql[64 * half + 32 * (p % 2) + l], bit pair p of qh[32 * half + l], minus 32;
    # scaled by the int8 scales[8 * half + 2 * p + l // 16].
    ql = field(0, 128)
    lead = ql.shape[:-1]
    low = _split_outer(ql.reshape(*lead, 2, 64), 4).reshape(*lead, 16, 16)
    qh = field(128, 64)
    high = _split_outer(qh.reshape(*lead, 2, 32), 2).reshape(*lead, 16, 16)
    q = ((low | (high << 4)).astype(jnp.int32) - 32).astype(jnp.float32)
    d = _f16(field, 208)[..., None] * _i8(field(192, 16))[..., None]
    return _merge_last(d * q, 2)


_DECODERS: dict[int, Callable[[ByteField], jax.Array]] = {
    GGMLType.F32: _f32_elem,
    GGMLType.F16: _f16_elem,
    GGMLType.BF16: _bf16_elem,
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q4_1: _q4_1,
    GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1,
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q2_K: _q2_k,
    GGMLType.Q3_K: _q3_k,
    GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k,
    GGMLType.Q6_K: _q6_k,
}
assert QK_K == 256, "the K-quant decoders above hard-code 256-element super-blocks"


def decode_blocks(field: ByteField, qtype: int) -> jax.Array:
    """Decode blocks of type `qtype` read through `field`: f32[..., block_size]."""
    return _DECODERS[quant_format(qtype).qtype](field)


def dequantize_blocks(blocks: jax.Array, qtype: int) -> jax.Array:
    """Decode packed blocks u8[..., block_bytes] into f32[..., block_size]."""
    fmt = quant_format(qtype)
    if blocks.dtype != jnp.uint8 or blocks.shape[-1:] != (fmt.block_bytes,):
        raise ValueError(
            f"{fmt.name} blocks must be u8[..., {fmt.block_bytes}]; got {blocks.dtype}{list(blocks.shape)}"
        )
    return decode_blocks(lambda offset, count: blocks[..., offset : offset + count], qtype)


@functools.partial(jax.jit, static_argnames=("qtype", "cols"))
def dequantize(data: jax.Array, qtype: int, cols: int) -> jax.Array:
    """Dequantize GGUF rows u8[..., row_bytes] of `cols` elements each into f32[..., cols].

    Leading axes (rows, stacked layers) pass through.  `qtype` and `cols` are static.
    """
    fmt = quant_format(qtype)
    expected = row_bytes(qtype, cols)
    if data.dtype != jnp.uint8 or data.ndim < 1 or data.shape[-1] != expected:
        raise ValueError(
            f"{fmt.name} rows of {cols} columns must be u8[..., {expected}]; "
            f"got {data.dtype}{list(data.shape)}"
        )
    lead = data.shape[:-1]
    blocks = data.reshape(*lead, cols // fmt.block_size, fmt.block_bytes)
    return dequantize_blocks(blocks, qtype).reshape(*lead, cols)
