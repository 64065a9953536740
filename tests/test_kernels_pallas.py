"""Pallas kernels against their jnp references, swept over shapes.

Every sweep runs twice: in interpret mode on any machine, and compiled
(`gpu` marker) where JAX's default backend is a GPU.  Interpret mode costs grows
with grid steps times operand size, so the shapes are small and the tiles big.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention import attention_reference, decode_attention, prefill_attention
from kernels.matmul import dequant_matmul, dequant_matmul_reference
from kernels.qtensor import QuantTensor
from kernels.quant_types import FORMATS, GGMLType, quant_format
from tests.quant_blocks import random_blocks


def _has_gpu() -> bool:
    return jax.default_backend() == "gpu"


_MODES = [
    pytest.param(True, id="interpret"),
    pytest.param(
        False,
        id="compiled",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not _has_gpu(), reason="needs a GPU backend")],
    ),
]


def _random_weight(qtype: int, rows: int, cols: int, seed: int) -> QuantTensor:
    """A QuantTensor of random packed blocks with small finite scales."""
    rng = np.random.default_rng(seed)
    fmt = quant_format(qtype)
    if qtype == GGMLType.F32:
        raw = rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint8)
    elif qtype == GGMLType.F16:
        raw = rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
    elif qtype == GGMLType.BF16:
        bits = rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32) >> 16
        raw = bits.astype(np.uint16).view(np.uint8)
    else:
        raw = random_blocks(qtype, rows, cols // fmt.block_size, seed, scale=0.05)
    return QuantTensor.from_packed(raw.reshape(rows, -1), qtype, (rows, cols))


def _assert_close(got: jax.Array, want: jax.Array, rtol: float = 2e-5) -> None:
    want = np.asarray(want)
    scale = max(float(np.abs(want).max()), 1.0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=rtol * scale)


def _check_matmul(qtype: int, m: int, n: int, k: int, interpret: bool, **knobs: int) -> None:
    w = _random_weight(qtype, n, k, seed=m * 7 + n)
    x = np.random.default_rng(k).standard_normal((m, k)).astype(np.float32)
    got = dequant_matmul(x, w, interpret=interpret, **knobs)
    assert got.shape == (m, n)
    _assert_close(got, dequant_matmul_reference(x, w))


@pytest.mark.parametrize("interpret", _MODES)
@pytest.mark.parametrize("qtype", sorted(FORMATS), ids=lambda q: FORMATS[q].name)
def test_dequant_matmul_every_type(qtype: int, interpret: bool) -> None:
    k = 512 if FORMATS[qtype].block_size == 256 else 128
    _check_matmul(qtype, m=3, n=48, k=k, interpret=interpret, block_rows=64, block_k=256)


@pytest.mark.parametrize("interpret", _MODES)
@pytest.mark.parametrize(
    ("qtype", "m", "n", "k", "knobs"),
    [
        # rows not a multiple of the tile: the tail tile must still be written
        (GGMLType.Q8_0, 1, 100, 96, dict(block_rows=64, block_k=64)),
        (GGMLType.Q4_1, 5, 37, 160, dict(block_rows=32, block_k=128)),
        # more activation rows than one m tile
        (GGMLType.Q4_K, 20, 70, 768, dict(block_rows=64, block_k=512)),
        (GGMLType.Q6_K, 17, 16, 256, dict(block_rows=16, block_m=16, block_k=256)),
        (GGMLType.F32, 33, 24, 40, dict(block_rows=32, block_m=32, block_k=32)),
    ],
    ids=lambda value: str(value) if not isinstance(value, dict) else "-",
)
def test_dequant_matmul_shape_sweep(
    qtype: int, m: int, n: int, k: int, knobs: dict[str, int], interpret: bool
) -> None:
    _check_matmul(qtype, m, n, k, interpret, **knobs)


def test_dequant_matmul_checks_its_inputs() -> None:
    w = _random_weight(GGMLType.Q8_0, 8, 64, seed=0)
    with pytest.raises(ValueError, match=r"x must be f32\[m, 64\]"):
        dequant_matmul(np.zeros((2, 32), np.float32), w, interpret=True)
    with pytest.raises(ValueError, match="block_rows must be a power of two"):
        dequant_matmul(np.zeros((2, 64), np.float32), w, block_rows=48, interpret=True)
    with pytest.raises(ValueError, match="multiple of the Q4_K block size"):
        q4k = _random_weight(GGMLType.Q4_K, 8, 256, seed=0)
        dequant_matmul(np.zeros((2, 256), np.float32), q4k, block_k=128, interpret=True)
    with pytest.raises(ValueError, match="stacked"):
        stacked = QuantTensor(jnp.stack([w.data, w.data]), w.qtype, w.shape)
        dequant_matmul(np.zeros((2, 64), np.float32), stacked, interpret=True)


def _attention_inputs(batch, steps, q_heads, kv_heads, head_dim, capacity, positions, lengths, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, steps, q_heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((batch, capacity, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, capacity, kv_heads, head_dim)).astype(np.float32)
    return q, k, v, jnp.asarray(positions, jnp.int32), jnp.asarray(lengths, jnp.int32)


def _run_pair(kernel, inputs, options, knobs, interpret):
    got = kernel(*inputs, **options, **knobs, interpret=interpret)
    want = attention_reference(*inputs, **options)
    assert np.isfinite(np.asarray(got)).all()
    _assert_close(got, want)
    return np.asarray(got)


# Each case: (q heads, kv heads, sliding window, softcap); GQA ratios 1, 3 and 4,
# each seen with and without a window.  Zipped rather than crossed: every
# interpret-mode case costs about a second of compilation.
_PREFILL_CASES = [
    (2, 2, None, None),
    (2, 2, 5, 30.0),
    (6, 2, None, 20.0),
    (6, 2, 6, None),
    (4, 1, None, None),
    (4, 1, 4, 30.0),
]


@pytest.mark.parametrize("interpret", _MODES)
@pytest.mark.parametrize(("q_heads", "kv_heads", "window", "softcap"), _PREFILL_CASES)
def test_prefill_attention_sweep(q_heads, kv_heads, window, softcap, interpret) -> None:
    # Row 0: a fresh prompt of 21 tokens in a 48-slot cache.  Row 1: 13 tokens
    # continuing at position 9 (kv_length 22 < S), then 8 padded queries at
    # position -1 that see nothing and must come out as zeros.
    positions = [list(range(21)), [*range(9, 22), *([-1] * 8)]]
    inputs = _attention_inputs(2, 21, q_heads, kv_heads, 16, 48, positions, [21, 22], seed=q_heads)
    options = dict(scale=0.25, sliding_window=window, logit_softcap=softcap)
    got = _run_pair(prefill_attention, inputs, options, dict(block_q=16, block_k=16), interpret)
    np.testing.assert_array_equal(got[1, 13:], 0.0)


@pytest.mark.parametrize("interpret", _MODES)
@pytest.mark.parametrize(
    ("capacity", "block_q", "block_k"),
    [(40, 16, 32), (64, 32, 64)],  # 40: ragged last key block
)
def test_prefill_attention_tiles(capacity, block_q, block_k, interpret) -> None:
    positions = [list(range(3, 3 + 19))]
    inputs = _attention_inputs(1, 19, 4, 2, 32, capacity, positions, [22], seed=capacity)
    options = dict(scale=32**-0.5, sliding_window=None, logit_softcap=None)
    _run_pair(prefill_attention, inputs, options, dict(block_q=block_q, block_k=block_k), interpret)


# Each case: (q heads, kv heads, sliding window, softcap, cache splits).
_DECODE_CASES = [
    (2, 2, None, None, 1),
    (2, 2, 5, None, 3),
    (6, 2, None, 50.0, 3),
    (6, 2, 12, None, 1),
    (4, 1, None, None, 2),
    (4, 1, 9, 50.0, 3),
]


@pytest.mark.parametrize("interpret", _MODES)
@pytest.mark.parametrize(("q_heads", "kv_heads", "window", "softcap", "num_splits"), _DECODE_CASES)
def test_decode_attention_sweep(q_heads, kv_heads, window, softcap, num_splits, interpret) -> None:
    # Row 0: full 40-slot cache.  Row 1: 17 of 40 slots.  Row 2: empty cache (padding row).
    positions = [[39], [16], [0]]
    inputs = _attention_inputs(3, 1, q_heads, kv_heads, 16, 40, positions, [40, 17, 0], seed=q_heads)
    options = dict(scale=0.25, sliding_window=window, logit_softcap=softcap)
    knobs = dict(block_k=16, num_splits=num_splits)
    got = _run_pair(decode_attention, inputs, options, knobs, interpret)
    np.testing.assert_array_equal(got[2], 0.0)


def test_decode_attention_rejects_several_steps() -> None:
    inputs = _attention_inputs(1, 2, 2, 2, 16, 16, [[0, 1]], [2], seed=0)
    with pytest.raises(ValueError, match="one query step"):
        decode_attention(*inputs, scale=1.0, interpret=True)
