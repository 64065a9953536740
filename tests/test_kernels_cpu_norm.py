"""kernels.cpu.rms_norm: RMS norm as llama.cpp's CPU backend computes it (ggml_rms_norm
then ggml_mul), against a transcription of ggml's loop in numpy, bit for bit, and against
the jnp reference (`ops.rms_norm` with impl="reference") to within its f32 summation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import cpu, ops

pytestmark = pytest.mark.skipif(
    not cpu.fused_available(),
    reason="needs the AVX-512 VNNI build of kernels.cpu (norms, SwiGLU, the panels layout)",
)


def _ggml(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """ggml_compute_forward_rms_norm_f32, then ggml_mul: each square rounded to f32 and
    added in f64 in order, `const float mean = sum / ne00`, `scale = 1.0f / sqrtf(mean +
    eps)`, y = x * scale, then y * weight."""
    out = np.empty_like(x)
    for index in np.ndindex(x.shape[:-1]):
        row = x[index]
        total = 0.0
        for square in row * row:  # f32 products
            total += float(square)
        mean = np.float32(total / row.shape[0])
        scale = np.float32(1.0) / np.sqrt(mean + np.float32(eps), dtype=np.float32)
        with np.errstate(invalid="ignore"):  # inf * 0 is NaN here as in ggml
            out[index] = (row * scale) * weight
    return out


def _case(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Rows of very different magnitudes, as hidden states are.
    magnitude = rng.uniform(0.01, 50.0, (*shape[:-1], 1))
    x = (rng.standard_normal(shape) * magnitude).astype(np.float32)
    return x, rng.standard_normal(shape[-1]).astype(np.float32)


@pytest.mark.parametrize(
    "shape",
    [(3, 576), (2, 5, 4, 256), (1, 640), (300, 576), (7, 100), (4, 17), (1, 1)],
    ids=["smollm2", "gemma3-heads", "gemma3", "prefill-chunk", "ragged", "narrow", "one"],
)
def test_gives_llama_cpps_bits(shape) -> None:
    x, weight = _case(shape)
    got = np.asarray(jax.jit(lambda x, w: ops.rms_norm(x, w, 1e-6, impl="cpu"))(x, weight))
    np.testing.assert_array_equal(got, _ggml(x, weight, 1e-6))
    want = np.asarray(ops.rms_norm(jnp.asarray(x), jnp.asarray(weight), 1e-6, impl="reference"))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def test_a_row_gets_the_same_bits_whatever_shares_the_call() -> None:
    x, weight = _case((64, 576), seed=3)
    norm = jax.jit(lambda x, w: ops.rms_norm(x, w, 1e-5, impl="cpu"))
    together = np.asarray(norm(x, weight))
    for row in (0, 7, 63):
        np.testing.assert_array_equal(np.asarray(norm(x[row : row + 1], weight)), together[row : row + 1])


def test_zero_rows_and_non_finite_values() -> None:
    x = np.zeros((3, 64), np.float32)
    x[1, 5] = np.nan
    x[2, 9] = np.inf
    weight = np.ones(64, np.float32)
    got = np.asarray(ops.rms_norm(x, weight, 1e-5, impl="cpu"))
    np.testing.assert_array_equal(got[0], np.zeros(64, np.float32))  # eps keeps it finite
    assert np.isnan(got[1]).all()  # a NaN spoils its whole row
    assert np.isnan(got[2, 9]) and not np.isnan(np.delete(got[2], 9)).any()  # inf: scale 0
    np.testing.assert_array_equal(got, _ggml(x, weight, 1e-5))  # NaNs in the same places


def test_auto_uses_the_kernel_on_cpu() -> None:
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU kernel path is chosen on the CPU backend only")
    x, weight = _case((5, 576), seed=5)
    auto = np.asarray(jax.jit(lambda x, w: ops.rms_norm(x, w, 1e-5))(x, weight))
    np.testing.assert_array_equal(auto, _ggml(x, weight, 1e-5))
    hlo = jax.jit(lambda x, w: ops.rms_norm(x, w, 1e-5)).lower(x, weight).as_text()
    assert cpu.NORM_TARGET in hlo


def test_checks_its_inputs() -> None:
    with pytest.raises(ValueError, match=r"weight f32\[d\]"):
        cpu.rms_norm(jnp.zeros((2, 8)), jnp.zeros(7), 1e-5)
