"""`QuantTensor`: packed GGUF weight bytes as a JAX pytree.

Owns the weight container that model code passes to `kernels.ops.matmul`.  The
packed bytes are the only pytree leaf; the GGML type and the logical matrix
shape are static metadata, so a QuantTensor crosses `jit`, can be stacked layer
by layer and sliced by `lax.scan` like any array.  GGUF stores a linear layer's
weight with one row per output feature, so `shape` is (out_features, in_features).

Imports only jax and numpy: never gguf, never swarm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kernels.dequant import dequantize
from kernels.quant_types import quant_format, row_bytes


@dataclasses.dataclass(frozen=True)
class QuantTensor:
    """Packed rows `data: u8[..., out, row_bytes]` of a GGML-typed `shape` = (out, in) matrix.

    Leading axes of `data` beyond the last two are stacked copies (layers).  Build
    one with `QuantTensor.from_packed`, which checks the sizes; the plain
    constructor does no checks because JAX rebuilds the object inside transforms.
    """

    data: jax.Array
    qtype: int
    shape: tuple[int, int]

    @classmethod
    def from_packed(cls, data: jax.Array | np.ndarray, qtype: int, shape: tuple[int, int]) -> QuantTensor:
        """Wrap packed rows u8[out, row_bytes] (or stacked u8[n, out, row_bytes]); checked."""
        fmt = quant_format(qtype)
        out_features, in_features = (int(d) for d in shape)
        expected = (out_features, row_bytes(qtype, in_features))
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

    def dequantize(self) -> jax.Array:
        """The weights as f32[..., out, in] (leading stacked axes kept)."""
        return dequantize(self.data, self.qtype, self.shape[1])


jax.tree_util.register_dataclass(QuantTensor, data_fields=["data"], meta_fields=["qtype", "shape"])


def stack(tensors: Sequence[QuantTensor]) -> QuantTensor:
    """Stack same-typed, same-shaped tensors along a new leading axis: data u8[n, out, row_bytes].

    The result is what `lax.scan` expects as an `xs` leaf: each step sees one
    QuantTensor with data u8[out, row_bytes].
    """
    if not tensors:
        raise ValueError("stack needs at least one QuantTensor")
    first = tensors[0]
    for index, tensor in enumerate(tensors):
        if (tensor.qtype, tensor.shape) != (first.qtype, first.shape):
            raise ValueError(
                f"cannot stack tensor {index} ({quant_format(tensor.qtype).name} {tensor.shape}) "
                f"with tensor 0 ({quant_format(first.qtype).name} {first.shape})"
            )
        if tensor.data.shape != first.data.shape:
            raise ValueError(
                f"cannot stack tensor {index} with data {list(tensor.data.shape)} "
                f"onto data {list(first.data.shape)}"
            )
    return QuantTensor(jnp.stack([t.data for t in tensors]), first.qtype, first.shape)
