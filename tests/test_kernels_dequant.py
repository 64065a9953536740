"""kernels.quant_types and kernels.dequant against the outside oracle, gguf-py."""

from __future__ import annotations

import gguf
import jax
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from kernels.dequant import dequantize, dequantize_blocks
from kernels.quant_types import FORMATS, GGMLType, quant_format, row_bytes, row_elements
from tests.quant_blocks import F16_FIELDS, random_blocks

_QUANTIZED = sorted(F16_FIELDS)
_GGUF_QUANTIZABLE = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0]


def _oracle(data: np.ndarray, qtype: int) -> np.ndarray:
    return gguf.quants.dequantize(np.asarray(data), GGMLQuantizationType(qtype))


def _assert_matches_oracle(data: np.ndarray, qtype: int, cols: int) -> None:
    got = np.asarray(dequantize(data, qtype, cols))
    want = _oracle(data, qtype).reshape(got.shape)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_table_sizes_equal_gguf() -> None:
    for qtype, fmt in FORMATS.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType(qtype)] == (fmt.block_size, fmt.block_bytes)
        assert GGMLQuantizationType(qtype).name == fmt.name


def test_table_covers_the_required_types() -> None:
    assert sorted(FORMATS) == [0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30]


@pytest.mark.parametrize("qtype", [9, 16, 23, 99])
def test_unsupported_type_names_it(qtype: int) -> None:
    with pytest.raises(ValueError, match=rf"GGML type {qtype} \("):
        quant_format(qtype)
    with pytest.raises(ValueError, match="not supported"):
        dequantize(np.zeros((1, 32), np.uint8), qtype, 32)


def test_row_size_arithmetic() -> None:
    assert row_bytes(GGMLType.Q4_K, 1024) == 4 * 144
    assert row_elements(GGMLType.Q4_K, 4 * 144) == 1024
    assert row_bytes(GGMLType.F32, 3) == 12
    with pytest.raises(ValueError, match="Q8_0 rows hold whole blocks of 32"):
        row_bytes(GGMLType.Q8_0, 48)
    with pytest.raises(ValueError, match="Q6_K rows hold whole blocks of 210 bytes"):
        row_elements(GGMLType.Q6_K, 200)


def test_dequantize_rejects_wrong_row_width() -> None:
    with pytest.raises(ValueError, match=r"Q8_0 rows of 64 columns must be u8\[\.\.\., 68\]"):
        dequantize(np.zeros((2, 67), np.uint8), GGMLType.Q8_0, 64)
    with pytest.raises(ValueError, match="blocks must be u8"):
        dequantize_blocks(np.zeros((2, 33), np.uint8), GGMLType.Q8_0)


@pytest.mark.parametrize("qtype", _QUANTIZED, ids=lambda q: FORMATS[q].name)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_raw_blocks_match_gguf(qtype: int, seed: int) -> None:
    blocks = 3 if FORMATS[qtype].block_size == 256 else 5
    data = random_blocks(qtype, rows=7, blocks=blocks, seed=seed)
    _assert_matches_oracle(data, qtype, blocks * FORMATS[qtype].block_size)


@pytest.mark.parametrize("qtype", _GGUF_QUANTIZABLE, ids=lambda q: FORMATS[q].name)
def test_gguf_quantized_weights_match_gguf(qtype: int) -> None:
    values = np.random.default_rng(3).standard_normal((6, 128)).astype(np.float32)
    data = gguf.quants.quantize(values, GGMLQuantizationType(qtype))
    _assert_matches_oracle(data, qtype, 128)
    # Coarse sanity beyond layout: the round trip stays near the input.
    np.testing.assert_allclose(np.asarray(dequantize(data, qtype, 128)), values, atol=0.35)


@pytest.mark.parametrize("qtype", [GGMLType.F32, GGMLType.F16, GGMLType.BF16], ids=lambda q: FORMATS[q].name)
def test_float_formats_match_gguf(qtype: int) -> None:
    values = np.random.default_rng(4).standard_normal((5, 40)).astype(np.float32) * 100
    if qtype == GGMLType.F32:
        data = values.view(np.uint8)
    else:
        data = gguf.quants.quantize(values, GGMLQuantizationType(qtype)).view(np.uint8)
    _assert_matches_oracle(data, qtype, 40)
    if qtype == GGMLType.F32:
        np.testing.assert_array_equal(np.asarray(dequantize(data, qtype, 40)), values)


def test_bf16_special_values_follow_gguf() -> None:
    values = np.array([[0.0, -0.0, np.inf, -np.inf, 1e-40, 3.0e38, -1.5, 7.0]], np.float32)
    data = gguf.quants.quantize(values, GGMLQuantizationType.BF16).view(np.uint8)
    _assert_matches_oracle(data, GGMLType.BF16, 8)


def test_leading_axes_pass_through() -> None:
    data = random_blocks(GGMLType.Q4_K, rows=6, blocks=2, seed=5)
    flat = np.asarray(dequantize(data, GGMLType.Q4_K, 512))
    stacked = np.asarray(dequantize(data.reshape(2, 3, -1), GGMLType.Q4_K, 512))
    np.testing.assert_array_equal(stacked.reshape(6, 512), flat)


def test_dequantize_runs_under_jit_with_traced_data() -> None:
    data = random_blocks(GGMLType.Q6_K, rows=4, blocks=1, seed=6)
    traced = jax.jit(lambda d: dequantize(d, GGMLType.Q6_K, 256) * 2.0)(data)
    np.testing.assert_allclose(np.asarray(traced), 2.0 * _oracle(data, GGMLType.Q6_K), rtol=1e-6)


@pytest.mark.realmodel
@pytest.mark.parametrize(
    ("model", "type_names"),
    [("smollm2-135m", ["Q4_1", "Q8_0", "F32"]), ("gemma3-270m", ["Q5_0", "Q8_0", "Q4_K", "Q6_K", "F32"])],
)
def test_real_model_tensors_match_gguf(opened_models, model: str, type_names: list[str]) -> None:
    gguf_file = opened_models(model).gguf
    first_of_type: dict[int, str] = {}
    for info in gguf_file.tensors.values():
        first_of_type.setdefault(info.qtype, info.name)
    for name in type_names:
        qtype = int(GGMLQuantizationType[name])
        assert qtype in first_of_type, f"{model} has no {name} tensor"
        info = gguf_file.tensor_info(first_of_type[qtype])
        packed = np.asarray(gguf_file.tensor_bytes(info.name))
        last = len(packed) - 1
        picked = packed[np.unique(np.minimum([0, 1, last // 2, last], last))]
        _assert_matches_oracle(picked, qtype, info.ne[0])
