"""The PANELS weight layout (kernels/qtensor.py): the GGUF's bytes permuted for the CPU kernel.

A model loaded for the CPU kernel holds its weights in this layout, so every reader of
the bytes must give what it gives on the GGUF's own rows: the round trip, row lookups
(the embedding table), dequantization, and the kernel's products, bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import cpu, ops
from kernels.qtensor import PANEL_FIELDS, PANEL_ROWS, PANELS, ROWS, QuantTensor, aligned_empty, stack
from kernels.quant_types import FORMATS, GGMLType, quant_format
from tests.quant_blocks import random_blocks

REPO = Path(__file__).resolve().parents[1]
PANEL_TYPES = sorted(PANEL_FIELDS)
needs_kernel = pytest.mark.skipif(
    not cpu.panels_available(),
    reason="needs a build of kernels.cpu that reads the panels layout (AVX-512 VNNI or AVX2)",
)


def _weight(qtype: int, n: int, k: int, seed: int) -> QuantTensor:
    blocks = random_blocks(qtype, rows=n, blocks=k // FORMATS[qtype].block_size, seed=seed, scale=0.05)
    return QuantTensor.from_packed(blocks, qtype, (n, k))


def _k(qtype: int) -> int:
    return 2 * FORMATS[qtype].block_size * (2 if FORMATS[qtype].block_size == 32 else 1)


@pytest.mark.parametrize("qtype", PANEL_TYPES, ids=lambda q: FORMATS[q].name)
def test_fields_tile_each_block(qtype: int) -> None:
    """The fields cover a block's bytes once each, in order, in whole units."""
    at = 0
    for offset, length, unit in PANEL_FIELDS[qtype]:
        assert offset == at and unit in (2, 4) and length % unit == 0
        at += length
    assert at == quant_format(qtype).block_bytes


@pytest.mark.parametrize("qtype", PANEL_TYPES, ids=lambda q: FORMATS[q].name)
def test_round_trip_permutes_every_byte(qtype: int) -> None:
    w = _weight(qtype, 48, _k(qtype), seed=1)
    panels = w.to_panels()
    assert (panels.layout, panels.shape, panels.data.shape) == (PANELS, w.shape, w.data.shape)
    # A permutation of the bytes, not a copy of them: same multiset, different order.
    assert not np.array_equal(np.asarray(panels.data), np.asarray(w.data))
    np.testing.assert_array_equal(
        np.sort(np.asarray(panels.data), axis=None), np.sort(np.asarray(w.data), axis=None)
    )
    back = panels.to_rows()
    assert back.layout == ROWS
    np.testing.assert_array_equal(np.asarray(back.data), np.asarray(w.data))
    assert panels.to_panels() is panels and w.to_rows() is w


@pytest.mark.parametrize("qtype", PANEL_TYPES, ids=lambda q: FORMATS[q].name)
def test_panel_fields_put_each_rows_units_side_by_side(qtype: int) -> None:
    """Where the kernel reads it: in panel p, block b, the field at `offset` holds unit u of
    row r at 16 * offset + unit * (16 * u + r) bytes from the block's start."""
    k = _k(qtype)
    w = _weight(qtype, 32, k, seed=2)
    rows = np.asarray(w.data).reshape(32, -1, quant_format(qtype).block_bytes)
    panels = np.asarray(w.to_panels().data).reshape(2, -1, PANEL_ROWS * quant_format(qtype).block_bytes)
    for offset, length, unit in PANEL_FIELDS[qtype]:
        for row in (0, 5, 31):
            for block in range(rows.shape[1]):
                for index in range(length // unit):
                    at = PANEL_ROWS * offset + unit * (PANEL_ROWS * index + row % PANEL_ROWS)
                    got = panels[row // PANEL_ROWS, block, at : at + unit]
                    want = rows[row, block, offset + unit * index : offset + unit * (index + 1)]
                    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("qtype", PANEL_TYPES, ids=lambda q: FORMATS[q].name)
def test_dequantize_and_take_read_either_layout(qtype: int) -> None:
    w = _weight(qtype, 64, _k(qtype), seed=3)
    panels = w.to_panels()
    np.testing.assert_array_equal(np.asarray(panels.dequantize()), np.asarray(w.dequantize()))
    ids = jnp.asarray([0, 17, 63, 17, 31, 32], jnp.int32)
    picked = panels.take(ids)
    assert picked.layout == ROWS and picked.shape == (6, w.in_features)
    np.testing.assert_array_equal(np.asarray(picked.data), np.asarray(w.take(ids).data))
    np.testing.assert_array_equal(
        np.asarray(ops.take_rows(panels, ids.reshape(2, 3))), np.asarray(ops.take_rows(w, ids.reshape(2, 3)))
    )
    traced = jax.jit(lambda t, i: t.take(i).data)(panels, ids)
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(picked.data))


def test_stacked_layers_convert_layer_by_layer() -> None:
    layers = [_weight(GGMLType.Q4_K, 32, 512, seed=seed) for seed in range(3)]
    stacked = stack([layer.to_panels() for layer in layers])
    assert stacked.layout == PANELS and stacked.data.shape == (3, 32, layers[0].data.shape[1])
    np.testing.assert_array_equal(np.asarray(stack(layers).to_panels().data), np.asarray(stacked.data))
    np.testing.assert_array_equal(np.asarray(stacked.to_rows().data), np.asarray(stack(layers).data))
    with pytest.raises(ValueError, match=r"rows\) with tensor 0 .*panels"):
        stack([layers[0].to_panels(), layers[1]])


@pytest.mark.parametrize("qtype", PANEL_TYPES, ids=lambda q: FORMATS[q].name)
def test_loading_and_tracing_permute_alike(qtype: int) -> None:
    """A loaded weight is permuted on the host a few panels at a time; under jit the
    same permutation runs in XLA. Both give the same bytes, stacked layers too, and
    over more panels than one host step takes."""
    for weight in (
        _weight(qtype, 48, _k(qtype), seed=6),
        stack([_weight(qtype, 32, _k(qtype), seed=seed) for seed in (7, 8)]),
        _weight(qtype, 16 * 200, 4 * FORMATS[qtype].block_size, seed=9),
    ):
        host = weight.to_panels()
        traced = jax.jit(lambda w: w.to_panels())(weight)
        assert host.layout == traced.layout == PANELS
        np.testing.assert_array_equal(np.asarray(host.data), np.asarray(traced.data))


def test_permuting_a_large_weight_takes_little_memory_beside_it() -> None:
    """Loading a model permutes its vocabulary table (Gemma 3's is 178 MB of Q8_0): the
    permutation takes one new array and small pieces, not the several whole-size copies
    that op-by-op array code makes (6 times the table's size for that table, measured)."""
    script = """
import numpy as np
from kernels.qtensor import QuantTensor
from kernels.quant_types import GGMLType

def rss():
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "VmHWM")):
            yield int(line.split()[1]) * 1024

rows = np.random.default_rng(0).integers(0, 256, (16 * 4096, 34 * 30), dtype=np.uint8)
weight = QuantTensor.from_packed(rows, GGMLType.Q8_0, (16 * 4096, 32 * 30))
weight.data.block_until_ready()
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # the peak RSS starts again from here
before, _ = rss()
panels = weight.to_panels()
panels.data.block_until_ready()
_, peak = rss()
print((peak - before) / rows.nbytes)
"""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    growth = float(result.stdout.split()[-1])
    assert growth < 1.3, f"permuting took {growth:.2f} times the weight's size beside it"


def test_read_only_bytes_are_held_in_place_and_writable_ones_copied() -> None:
    """A GGUF's tensors are read-only memory-mapped bytes: on CPU a weight wraps them
    without a copy where they are 64-byte aligned (served from the page cache). Bytes a
    caller may still change are copied, so changing them later does not change the weight."""
    blocks = random_blocks(GGMLType.Q4_0, rows=16, blocks=2, seed=10)
    frozen = aligned_empty(blocks.shape)  # GGUF tensors at a 64-byte boundary
    frozen[:] = blocks
    frozen.flags.writeable = False
    held = QuantTensor.from_packed(frozen, GGMLType.Q4_0, (16, 64))
    if jax.default_backend() == "cpu":
        assert np.shares_memory(np.asarray(held.data), frozen)
    np.testing.assert_array_equal(np.asarray(held.data), blocks)
    copied = QuantTensor.from_packed(blocks, GGMLType.Q4_0, (16, 64))
    blocks[:] = 0
    np.testing.assert_array_equal(np.asarray(copied.data), frozen)


def test_to_panels_names_what_it_cannot_take() -> None:
    with pytest.raises(ValueError, match="multiple of 16 rows; this is Q8_0 with 24"):
        _weight(GGMLType.Q8_0, 24, 64, seed=4).to_panels()
    q2 = QuantTensor.from_packed(
        random_blocks(GGMLType.Q2_K, rows=16, blocks=1, seed=5), GGMLType.Q2_K, (16, 256)
    )
    assert not q2.can_use_panels()
    with pytest.raises(ValueError, match="this is Q2_K"):
        q2.to_panels()


@needs_kernel
@pytest.mark.parametrize("qtype", PANEL_TYPES, ids=lambda q: FORMATS[q].name)
@pytest.mark.parametrize("m", [1, 3, 8, 64, 300])
def test_kernel_gives_the_rows_products_bit_for_bit(qtype: int, m: int) -> None:
    """Both layouts go through the same per-lane arithmetic: fused (few rows) and stored panels."""
    k = _k(qtype) * 4
    w = _weight(qtype, 80, k, seed=6 + m)
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    rows = np.asarray(cpu.qmatmul(x, w))
    panels = np.asarray(cpu.qmatmul(x, w.to_panels()))
    np.testing.assert_array_equal(panels, rows)


@needs_kernel
def test_kernel_rejects_a_panels_weight_that_is_no_whole_panel() -> None:
    w = _weight(GGMLType.Q8_0, 24, 64, seed=7)
    broken = QuantTensor(w.data, w.qtype, w.shape, PANELS)
    with pytest.raises(ValueError, match="multiple of 16 rows; got 24"):
        cpu.qmatmul(np.ones((1, 64), np.float32), broken)


@needs_kernel
def test_kernel_reads_a_scrambled_panel_differently() -> None:
    """The kernel really reads the PANELS bytes as such: the rows bytes under a PANELS
    label give other products."""
    w = _weight(GGMLType.Q4_1, 32, 256, seed=8)
    mislabeled = QuantTensor(w.data, w.qtype, w.shape, PANELS)
    x = np.random.default_rng(9).standard_normal((2, 256)).astype(np.float32)
    assert not np.allclose(np.asarray(cpu.qmatmul(x, mislabeled)), np.asarray(cpu.qmatmul(x, w)))


@pytest.mark.skipif(
    not cpu.panels_available() or jax.default_backend() != "cpu",
    reason="arrange picks panels for the AVX-512 and AVX2 CPU kernels only",
)
def test_arrange_picks_panels_only_for_the_cpu_kernel() -> None:
    w = _weight(GGMLType.Q5_0, 32, 640, seed=10)
    assert ops.arrange(w).layout == PANELS
    assert ops.arrange(w, impl="cpu").layout == PANELS
    assert ops.arrange(w, impl="reference") is w
    odd = _weight(GGMLType.Q5_0, 40, 640, seed=11)
    assert ops.arrange(odd) is odd  # not whole panels: the kernel reads its rows
    dense = np.ones((16, 64), np.float32)
    assert ops.arrange(dense) is dense
    x = np.random.default_rng(12).standard_normal((3, 640)).astype(np.float32)
    np.testing.assert_array_equal(
        np.asarray(ops.matmul(x, ops.arrange(w))), np.asarray(ops.matmul(x, w, impl="cpu"))
    )
    np.testing.assert_allclose(
        np.asarray(ops.matmul(x, ops.arrange(w), impl="reference")),
        np.asarray(ops.matmul(x, w, impl="reference")),
        rtol=0,
        atol=0,
    )
