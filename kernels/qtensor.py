"""`QuantTensor`: packed GGUF weight bytes as a JAX pytree.

Owns the weight container that model code passes to `kernels.ops.matmul`.  The
packed bytes are the only pytree leaf; the GGML type and the logical matrix
shape are static metadata, so a QuantTensor crosses `jit`, can be stacked layer
by layer and sliced by `lax.scan` like any array.  GGUF stores a linear layer's
weight with one row per output feature, so `shape` is (out_features, in_features).

The bytes come in one of two layouts (static metadata too): ROWS, the GGUF's own,
and PANELS, the same bytes permuted for the CPU kernel (kernels/cpu/panel.h).  A
panel is 16 consecutive rows, what the kernel decodes at once.  In PANELS, a
panel is stored block by block, and within the 16 rows' block b, field by field
(`PANEL_FIELDS`: the f16 scales, the scale bytes, the high bits, the codes): a
field of 2-byte units holds the 16 rows' values side by side, one of 4-byte
units holds unit 0 of the 16 rows, then unit 1, and so on.  So the kernel reads
a panel as one sequential stream (not 16 strided ones) and loads each field
straight into a register whose lanes are the 16 rows, with no transposition.
`to_panels` / `to_rows` convert; everything that reads the bytes (dequantize,
`kernels.ops.take_rows`, the kernels) handles both.

Imports only jax and numpy: never gguf, never swarm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kernels.dequant import dequantize
from kernels.quant_types import GGMLType, quant_format, row_bytes

ROWS = "rows"
PANELS = "panels"
LAYOUTS = (ROWS, PANELS)
PANEL_ROWS = 16  # rows per panel: kPanelRows of kernels/cpu/panel.h

# The fields of a block as the PANELS layout groups them: (offset, length, unit) in
# bytes, covering the block (ggml-common.h's block structs) in order.  kernels/cpu/panel.h
# reads them by the same offsets; tests check both layouts give the same products.
PANEL_FIELDS: dict[int, tuple[tuple[int, int, int], ...]] = {
    GGMLType.Q4_0: ((0, 2, 2), (2, 16, 4)),  # d; qs
    GGMLType.Q4_1: ((0, 2, 2), (2, 2, 2), (4, 16, 4)),  # d; m; qs
    GGMLType.Q5_0: ((0, 2, 2), (2, 4, 4), (6, 16, 4)),  # d; qh; qs
    GGMLType.Q5_1: ((0, 2, 2), (2, 2, 2), (4, 4, 4), (8, 16, 4)),  # d; m; qh; qs
    GGMLType.Q8_0: ((0, 2, 2), (2, 32, 4)),  # d; qs
    GGMLType.Q4_K: ((0, 2, 2), (2, 2, 2), (4, 12, 4), (16, 128, 4)),  # d; dmin; scales; qs
    GGMLType.Q5_K: ((0, 2, 2), (2, 2, 2), (4, 12, 4), (16, 32, 4), (48, 128, 4)),  # ...; qh; qs
    GGMLType.Q6_K: ((0, 128, 4), (128, 64, 4), (192, 16, 4), (208, 2, 2)),  # ql; qh; scales; d
}


@dataclasses.dataclass(frozen=True)
class QuantTensor:
    """Packed rows `data: u8[..., out, row_bytes]` of a GGML-typed `shape` = (out, in) matrix.

    Leading axes of `data` beyond the last two are stacked copies (layers).  Build
    one with `QuantTensor.from_packed`, which checks the sizes; the plain
    constructor does no checks because JAX rebuilds the object inside transforms.
    `layout` is ROWS (the GGUF's byte order) or PANELS (see the module docstring).
    """

    data: jax.Array
    qtype: int
    shape: tuple[int, int]
    layout: str = ROWS

    @classmethod
    def from_packed(cls, data: jax.Array | np.ndarray, qtype: int, shape: tuple[int, int]) -> QuantTensor:
        """Wrap packed rows u8[out, row_bytes] (or stacked u8[n, out, row_bytes]); checked."""
        fmt = quant_format(qtype)
        out_features, in_features = (int(d) for d in shape)
        expected = (out_features, row_bytes(qtype, in_features))
        if isinstance(data, np.ndarray) and not data.flags.writeable:
            # Read-only host bytes (a GGUF's memory map): on CPU the array holds them in
            # place where they are 64-byte aligned, served from the page cache as
            # llama.cpp serves its weights; elsewhere device_put copies them.
            data = jax.device_put(data)
        else:
            data = jnp.asarray(data)
        if data.dtype != jnp.uint8 or data.ndim < 2 or tuple(data.shape[-2:]) != expected:
            raise ValueError(
                f"{fmt.name} weight of shape {(out_features, in_features)} needs data "
                f"u8[..., {expected[0]}, {expected[1]}]; got {data.dtype}{list(data.shape)}"
            )
        return cls(data, fmt.qtype, (out_features, in_features))

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def can_use_panels(self) -> bool:
        """Whether the PANELS layout exists for this type and shape (whole panels only)."""
        return self.qtype in PANEL_FIELDS and self.out_features % PANEL_ROWS == 0

    def _panel_grid(self) -> tuple[tuple[int, ...], int, int, int]:
        """(stacked axes, panels, blocks per row, bytes per block)."""
        block_bytes = quant_format(self.qtype).block_bytes
        blocks = self.data.shape[-1] // block_bytes
        return tuple(self.data.shape[:-2]), self.out_features // PANEL_ROWS, blocks, block_bytes

    def to_panels(self) -> QuantTensor:
        """The same bytes in the PANELS layout (itself if already there)."""
        if self.layout == PANELS:
            return self
        if not self.can_use_panels():
            raise ValueError(
                f"the panels layout needs a {', '.join(quant_format(q).name for q in PANEL_FIELDS)} weight "
                f"with a multiple of {PANEL_ROWS} rows; this is {quant_format(self.qtype).name} "
                f"with {self.out_features}"
            )
        if not isinstance(self.data, jax.core.Tracer):
            # A weight being loaded: permuted on the host a few panels at a time, into the
            # one buffer the device array then holds (JAX's op-by-op copies of a whole
            # vocabulary table took 6 times its size at once).
            data = jax.device_put(_panels_of_rows(np.asarray(self.data), self.qtype, self.out_features))
            return QuantTensor(data, self.qtype, self.shape, PANELS)
        lead, panels, blocks, block_bytes = self._panel_grid()
        grid = self.data.reshape(*lead, panels, PANEL_ROWS, blocks, block_bytes)
        data = _panel_blocks(jnp, grid, self.qtype).reshape(self.data.shape)
        return QuantTensor(data, self.qtype, self.shape, PANELS)

    def _panel_fields(self, grid: jax.Array) -> list[jax.Array]:
        """The fields of PANELS blocks grid [..., 16 * block_bytes] as [..., units, 16, unit]."""
        parts, at = [], 0
        for _, length, unit in PANEL_FIELDS[self.qtype]:
            field = grid[..., at : at + PANEL_ROWS * length]
            parts.append(field.reshape(*grid.shape[:-1], length // unit, PANEL_ROWS, unit))
            at += PANEL_ROWS * length
        return parts

    def to_rows(self) -> QuantTensor:
        """The same bytes in the GGUF's ROWS layout (itself if already there)."""
        if self.layout == ROWS:
            return self
        lead, panels, blocks, block_bytes = self._panel_grid()
        grid = self.data.reshape(*lead, panels, blocks, PANEL_ROWS * block_bytes)
        parts = [
            jnp.swapaxes(field, -3, -2).reshape(*grid.shape[:-1], PANEL_ROWS, -1)
            for field in self._panel_fields(grid)
        ]
        rows = jnp.concatenate(parts, axis=-1)  # [..., panel, block, row, byte]
        data = jnp.swapaxes(rows, -3, -2).reshape(self.data.shape)
        return QuantTensor(data, self.qtype, self.shape, ROWS)

    def take(self, ids: jax.Array) -> QuantTensor:
        """Rows `ids` (i32[r]) of a single (unstacked) tensor, in the ROWS layout."""
        if self.data.ndim != 2:
            raise ValueError(f"take needs a single weight; got data {list(self.data.shape)}")
        count = int(ids.shape[0])
        if self.layout == ROWS:
            return QuantTensor(jnp.take(self.data, ids, axis=0), self.qtype, (count, self.in_features))
        _, panels, blocks, block_bytes = self._panel_grid()
        grid = jnp.take(
            self.data.reshape(panels, blocks, PANEL_ROWS * block_bytes), ids // PANEL_ROWS, axis=0
        )
        lane, picked = ids % PANEL_ROWS, jnp.arange(count)
        parts = []
        for field in self._panel_fields(grid):  # [r, block, units, 16, unit]
            field = jnp.moveaxis(field, -2, 1)[picked, lane]  # [r, block, units, unit]
            parts.append(field.reshape(count, blocks, -1))
        data = jnp.concatenate(parts, axis=-1).reshape(count, blocks * block_bytes)
        return QuantTensor(data, self.qtype, (count, self.in_features))

    def dequantize(self) -> jax.Array:
        """The weights as f32[..., out, in] (leading stacked axes kept)."""
        return dequantize(self.to_rows().data, self.qtype, self.shape[1])


# JAX's CPU arrays hold host bytes in place (no copy) where they start at a multiple of this.
HOST_ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialized u8 array starting at a multiple of HOST_ALIGNMENT bytes."""
    size = int(np.prod(shape))
    raw = np.empty(size + HOST_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % HOST_ALIGNMENT
    return raw[start : start + size].reshape(shape)


# Bytes of rows one step of `_panels_of_rows` permutes: its temporaries stay this small.
_PANEL_CHUNK_BYTES = 1 << 20


def _panels_of_rows(rows: np.ndarray, qtype: int, out_features: int) -> np.ndarray:
    """`QuantTensor.to_panels` on host bytes u8[..., out, row_bytes]: the same permutation,
    done a few panels at a time into one new array."""
    block_bytes = quant_format(qtype).block_bytes
    blocks = rows.shape[-1] // block_bytes
    panels = out_features // PANEL_ROWS
    source = rows.reshape(-1, panels, PANEL_ROWS, blocks, block_bytes)
    target = aligned_empty((source.shape[0], panels, blocks, PANEL_ROWS * block_bytes))
    step = max(1, _PANEL_CHUNK_BYTES // (PANEL_ROWS * rows.shape[-1]))
    for layer in range(source.shape[0]):
        for first in range(0, panels, step):
            target[layer, first : first + step] = _panel_blocks(
                np, source[layer, first : first + step], qtype
            )
    return target.reshape(rows.shape)


def _panel_blocks(xp, grid, qtype: int):
    """Panels of rows grid [..., panel, row, block, byte] as [..., panel, block, 16 *
    block_bytes], each block's fields with the 16 rows' units side by side; `xp` is numpy
    (host bytes) or jax.numpy (traced)."""
    grid = xp.swapaxes(grid, -3, -2)  # [..., panel, block, row, byte]
    parts = []
    for offset, length, unit in PANEL_FIELDS[qtype]:
        field = grid[..., offset : offset + length].reshape(*grid.shape[:-1], length // unit, unit)
        parts.append(xp.swapaxes(field, -3, -2).reshape(*grid.shape[:-2], PANEL_ROWS * length))
    return xp.concatenate(parts, axis=-1)


jax.tree_util.register_dataclass(QuantTensor, data_fields=["data"], meta_fields=["qtype", "shape", "layout"])


def stack(tensors: Sequence[QuantTensor]) -> QuantTensor:
    """Stack same-typed, same-shaped tensors along a new leading axis: data u8[n, out, row_bytes].

    The result is what `lax.scan` expects as an `xs` leaf: each step sees one
    QuantTensor with data u8[out, row_bytes].
    """
    if not tensors:
        raise ValueError("stack needs at least one QuantTensor")
    first = tensors[0]
    for index, tensor in enumerate(tensors):
        if (tensor.qtype, tensor.shape, tensor.layout) != (first.qtype, first.shape, first.layout):
            raise ValueError(
                f"cannot stack tensor {index} ({quant_format(tensor.qtype).name} {tensor.shape}, {tensor.layout}) "
                f"with tensor 0 ({quant_format(first.qtype).name} {first.shape}, {first.layout})"
            )
        if tensor.data.shape != first.data.shape:
            raise ValueError(
                f"cannot stack tensor {index} with data {list(tensor.data.shape)} "
                f"onto data {list(first.data.shape)}"
            )
    return QuantTensor(jnp.stack([t.data for t in tensors]), first.qtype, first.shape, first.layout)
