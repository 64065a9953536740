"""GGML tensor formats as a table of data: block size and byte size per type.

Owns the numeric type ids of the GGML formats this project can decode and the
size arithmetic on them (bytes per row, elements per row).  The numbers are
those of `ggml_type_traits` in ggml.c (`blck_size`, `type_size`); a test checks
them against gguf-py's `GGML_QUANT_SIZES`.

Imports nothing but the standard library: it must not import gguf or swarm.
"""

from __future__ import annotations

import dataclasses
import enum

# QK_K in ggml-common.h: elements per super-block of the K-quants.
QK_K = 256


class GGMLType(enum.IntEnum):
    """Type ids of the supported formats, as in `enum ggml_type` (ggml.h)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    BF16 = 30


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """One GGML storage format: `block_size` elements packed in `block_bytes`."""

    qtype: int
    name: str
    block_size: int
    block_bytes: int

    @property
    def is_float(self) -> bool:
        """True for the unquantized formats (F32, F16, BF16): one element per block."""
        return self.block_size == 1


def _format(qtype: GGMLType, block_size: int, block_bytes: int) -> QuantFormat:
    return QuantFormat(int(qtype), qtype.name, block_size, block_bytes)


# Layout sizes from the block structs in ggml-common.h (`block_q4_0`, `block_q4_K`, ...).
FORMATS: dict[int, QuantFormat] = {
    f.qtype: f
    for f in (
        _format(GGMLType.F32, 1, 4),
        _format(GGMLType.F16, 1, 2),
        _format(GGMLType.Q4_0, 32, 2 + 16),
        _format(GGMLType.Q4_1, 32, 2 + 2 + 16),
        _format(GGMLType.Q5_0, 32, 2 + 4 + 16),
        _format(GGMLType.Q5_1, 32, 2 + 2 + 4 + 16),
        _format(GGMLType.Q8_0, 32, 2 + 32),
        _format(GGMLType.Q2_K, QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),
        _format(GGMLType.Q3_K, QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
        _format(GGMLType.Q4_K, QK_K, 2 + 2 + 12 + QK_K // 2),
        _format(GGMLType.Q5_K, QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
        _format(GGMLType.Q6_K, QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
        _format(GGMLType.BF16, 1, 2),
    )
}

# Names of the GGML types this table does not decode, so errors can say which one it was.
_UNSUPPORTED_NAMES: dict[int, str] = {
    4: "Q4_2 (removed from ggml)",
    5: "Q4_3 (removed from ggml)",
    9: "Q8_1",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
    34: "TQ1_0",
    35: "TQ2_0",
    39: "MXFP4",
}


def quant_format(qtype: int) -> QuantFormat:
    """The format of GGML type id `qtype`; ValueError naming the type if unsupported."""
    found = FORMATS.get(int(qtype))
    if found is None:
        name = _UNSUPPORTED_NAMES.get(int(qtype), "unknown")
        supported = ", ".join(f.name for f in FORMATS.values())
        raise ValueError(f"GGML type {int(qtype)} ({name}) is not supported; supported types: {supported}")
    return found


def type_name(qtype: int) -> str:
    """Name of a supported GGML type id, e.g. 12 -> "Q4_K"."""
    return quant_format(qtype).name


def row_bytes(qtype: int, cols: int) -> int:
    """Bytes one row of `cols` elements occupies; cols must be a whole number of blocks."""
    fmt = quant_format(qtype)
    if cols <= 0 or cols % fmt.block_size:
        raise ValueError(
            f"{fmt.name} rows hold whole blocks of {fmt.block_size} elements; got {cols} columns"
        )
    return cols // fmt.block_size * fmt.block_bytes


def row_elements(qtype: int, nbytes: int) -> int:
    """Elements in one row of `nbytes` packed bytes (the inverse of `row_bytes`)."""
    fmt = quant_format(qtype)
    if nbytes <= 0 or nbytes % fmt.block_bytes:
        raise ValueError(f"{fmt.name} rows hold whole blocks of {fmt.block_bytes} bytes; got {nbytes} bytes")
    return nbytes // fmt.block_bytes * fmt.block_size
