"""Numeric kernels: GGML dequantization, quantized matmul and KV-cache attention.

Model code calls `kernels.ops.matmul` and `kernels.ops.attention` and hands
weights over as plain arrays or `QuantTensor`s; everything below that (format
tables, decoders, Pallas kernels, their jnp references) lives here.  The entry
points are reached through `ops` because the names `matmul` and `attention`
here belong to the kernel modules.

This package imports only jax and numpy: never gguf, never swarm.
"""

from kernels import ops
from kernels.dequant import dequantize
from kernels.qtensor import QuantTensor, stack
from kernels.quant_types import FORMATS, GGMLType, QuantFormat, quant_format, row_bytes

__all__ = [
    "FORMATS",
    "GGMLType",
    "QuantFormat",
    "QuantTensor",
    "dequantize",
    "ops",
    "quant_format",
    "row_bytes",
    "stack",
]
