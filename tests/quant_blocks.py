"""Random packed GGML blocks for kernel tests.

Random bytes are valid blocks of every quantized type once their f16 scale fields
are finite; gguf-py cannot quantize the K-quants, so tests build blocks this way.
"""

from __future__ import annotations

import numpy as np

from kernels.quant_types import GGMLType, quant_format

# Byte offsets of the ggml_fp16_t scale fields in each block (block structs, ggml-common.h).
F16_FIELDS = {
    GGMLType.Q4_0: (0,),
    GGMLType.Q4_1: (0, 2),
    GGMLType.Q5_0: (0,),
    GGMLType.Q5_1: (0, 2),
    GGMLType.Q8_0: (0,),
    GGMLType.Q2_K: (80, 82),
    GGMLType.Q3_K: (108,),
    GGMLType.Q4_K: (0, 2),
    GGMLType.Q5_K: (0, 2),
    GGMLType.Q6_K: (208,),
}


def random_blocks(qtype: int, rows: int, blocks: int, seed: int, scale: float = 2.0) -> np.ndarray:
    """Random packed rows u8[rows, blocks * block_bytes] with f16 scales in [-scale, scale]."""
    rng = np.random.default_rng(seed)
    fmt = quant_format(qtype)
    raw = rng.integers(0, 256, size=(rows, blocks, fmt.block_bytes), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        values = rng.uniform(-scale, scale, size=(rows, blocks)).astype(np.float16)
        raw[..., offset : offset + 2] = values.view(np.uint8).reshape(rows, blocks, 2)
    return raw.reshape(rows, blocks * fmt.block_bytes)
