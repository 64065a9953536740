"""F32 copies of GGUF models: the same metadata, every tensor dequantized to float32.

Owns `write_f32_variant` and `f32_variant_path`. Why they exist: llama.cpp's CPU backend
quantizes the activations inside every quantized matmul (`type_traits_cpu[..].vec_dot_type`
is Q8_0/Q8_1/Q8_K for quantized weights), so on a quantized GGUF its logits differ from an
exact float32 engine by its own rounding noise. On an F32 copy (F32 weights have
vec_dot_type F32) with an F32 KV cache it does plain float32 arithmetic, so the copy lets
tests check the architecture on the real weights to float32 accuracy.

The copy keeps every key-value with its value type (array element types included, strings
as raw bytes), the tensor names, order and logical shapes; the values are
`gguf.quants.dequantize` of the source blocks, the same numbers an exact dequantizer gives.
Output is byte for byte the same on every run. Imports only numpy and gguf-py; never the
engine.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.gguf_reader import ReaderField, ReaderTensor
from gguf.quants import dequantize

# Part of the cache file name: bump it whenever write_f32_variant's output changes, so
# copies written by an older version are not reused.
VARIANT_FORMAT = 1
_ARCHITECTURE_KEY = "general.architecture"
_ALIGNMENT_KEY = "general.alignment"


def _key_value(field: ReaderField) -> tuple[Any, GGUFValueType, GGUFValueType | None]:
    """(value, value type, array element type) of one reader field, ready for the writer.

    Strings stay raw bytes (`GGUFWriter._pack_val` writes bytes as they are), so a token
    that is not valid UTF-8 is copied unchanged instead of failing to decode.
    """
    value_type = field.types[0]
    if value_type == GGUFValueType.STRING:
        return bytes(field.parts[-1]), value_type, None
    if value_type != GGUFValueType.ARRAY:
        return field.contents(), value_type, None
    if len(field.types) != 2:
        raise NotImplementedError(f"{field.name}: nested GGUF arrays are not supported")
    element_type = field.types[1]
    if element_type == GGUFValueType.STRING:
        return [bytes(field.parts[index]) for index in field.data], value_type, element_type
    return field.contents(), value_type, element_type


def _logical_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    """The numpy shape of a tensor: GGUF lists ne[0] (the contiguous row length) first."""
    return tuple(int(size) for size in reversed(tensor.shape))


def _dequantized(tensor: ReaderTensor) -> np.ndarray:
    """f32[logical shape]: the tensor's values, C-contiguous."""
    values = dequantize(tensor.data, tensor.tensor_type)
    return np.ascontiguousarray(values, dtype=np.float32).reshape(_logical_shape(tensor))


def write_f32_variant(source: Path, target: Path) -> Path:
    """Write `source` to `target` with every tensor dequantized to F32; returns `target`.

    Tensors are dequantized and written one at a time, so memory holds one F32 tensor (and
    its dequantization temporaries), never the whole model.
    """
    reader = GGUFReader(source)
    architecture = reader.fields[_ARCHITECTURE_KEY].contents()
    writer = GGUFWriter(target, architecture)
    try:
        for name, field in reader.fields.items():
            # GGUF.* are the reader's own header fields (version, counts), not key-values.
            if name.startswith("GGUF.") or name == _ARCHITECTURE_KEY:
                continue
            value, value_type, element_type = _key_value(field)
            writer.add_key_value(name, value, value_type, sub_type=element_type)
            if name == _ALIGNMENT_KEY:
                writer.data_alignment = int(value)
        for tensor in reader.tensors:
            shape = _logical_shape(tensor)
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(np.float32).itemsize
            writer.add_tensor_info(
                tensor.name, shape, np.dtype(np.float32), nbytes, raw_dtype=GGMLQuantizationType.F32
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            writer.write_tensor_data(_dequantized(tensor))
    finally:
        writer.close()
    return target


def _sha256_prefix(path: Path, length: int = 16) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def f32_variant_path(source: Path, cache_dir: Path) -> Path:
    """The F32 copy of `source` in `cache_dir`, written on first use and reused after.

    The file is named by the source's content hash and VARIANT_FORMAT; it is written under
    a temporary name in `cache_dir` and renamed into place, so a concurrent or interrupted
    writer never leaves a partial file under the final name.
    """
    target = cache_dir / f"{source.stem}.f32-v{VARIANT_FORMAT}-{_sha256_prefix(source)}.gguf"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=cache_dir, prefix=f".{target.name}.", suffix=".partial")
    os.close(handle)
    try:
        write_f32_variant(source, Path(temporary))
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; the copy is an ordinary data file
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target
