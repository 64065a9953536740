"""kernels.cpu.swiglu: silu(gate) * up as llama.cpp's CPU backend computes it
(ggml_vec_swiglu_f32 with ggml's AVX-512 exp), against a transcription of that
arithmetic in numpy, bit for bit, and against jnp (`ops.gated` with impl="reference").
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

F = np.float32


def _hex(text: str) -> np.float32:
    """A C hex float literal (ggml writes its constants so) as f32."""
    return F(float.fromhex(text))


def _fma(a, b, c):
    """a * b + c rounded once, as the FMA instructions do (exact in f64 for f32 inputs)."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(F)


def _ggml_expf(x: np.ndarray) -> np.ndarray:
    """ggml_v_expf, step by step in f32 (each FMA rounded once)."""
    x = x.astype(F)
    with np.errstate(all="ignore"):  # infinities and NaNs pass through as the vector code's do
        return _ggml_expf_quiet(x)


def _ggml_expf_quiet(x: np.ndarray) -> np.ndarray:
    shift = _hex("0x1.8p23")
    z = _fma(x, _hex("0x1.715476p0"), shift)
    n = (z - shift).astype(F)
    b = _fma(-n, _hex("0x1.7F7D1Cp-20"), _fma(-n, _hex("0x1.62E4p-1"), x))
    u = (b * b).astype(F)
    j = _fma(
        _fma(
            _fma(_hex("0x1.0E4020p-7"), b, _hex("0x1.573E2Ep-5")),
            u,
            _fma(_hex("0x1.555E66p-3"), b, _hex("0x1.FFFDB6p-2")),
        ),
        u,
        _fma(_hex("0x1.FFFFECp-1"), b, F(1.0)),
    )
    huge = np.abs(n) > 192  # then 0 for n <= 0, inf above
    scale = np.where(huge, 0, n).astype(np.int32)
    result = np.ldexp(j, scale).astype(F)  # vscalefps: j * 2^n, rounded once
    return np.where(huge, np.where(n <= 0, F(0.0), F(np.inf)), result).astype(F)


def _ggml_swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """ggml_vec_swiglu_f32 over the last axis: 16-lane vectors, then a scalar tail."""
    n = gate.shape[-1]
    vector = (n // 16) * 16
    out = np.empty_like(gate)
    with np.errstate(all="ignore"):
        g = gate[..., :vector]
        out[..., :vector] = (g / (F(1.0) + _ggml_expf(-g))).astype(F) * up[..., :vector]
        tail = gate[..., vector:]
        out[..., vector:] = (tail / (F(1.0) + np.exp(-tail))).astype(F) * up[..., vector:]
    return out


def _case(shape, seed=0, scale=4.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale).astype(F), rng.standard_normal(shape).astype(F)


@pytest.mark.parametrize(
    "shape",
    [(3, 1536), (128, 1536), (2, 3, 64), (5, 16)],
    ids=["smollm2", "prefill-chunk", "heads", "one-vector"],
)
def test_gives_llama_cpps_bits(shape) -> None:
    gate, up = _case(shape)
    got = np.asarray(jax.jit(lambda g, u: ops.gated("silu", g, u, impl="cpu"))(gate, up))
    np.testing.assert_array_equal(got, _ggml_swiglu(gate, up))
    want = np.asarray(ops.gated("silu", jnp.asarray(gate), jnp.asarray(up), impl="reference"))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-30)


def test_rows_with_a_scalar_tail() -> None:
    gate, up = _case((4, 37), seed=1)  # 32 in vectors, 5 one by one, in every row
    got = np.asarray(ops.gated("silu", gate, up, impl="cpu"))
    want = np.asarray(ops.gated("silu", jnp.asarray(gate), jnp.asarray(up), impl="reference"))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-30)
    np.testing.assert_array_equal(got[:, :32], _ggml_swiglu(gate, up)[:, :32])


def test_extremes() -> None:
    gate = np.array([-200.0, -90.0, -1e-30, 0.0, 1e-30, 90.0, 200.0, np.inf, -np.inf, np.nan] + [1.0] * 6, F)
    up = np.ones(16, F)
    got = np.asarray(ops.gated("silu", gate, up, impl="cpu"))
    np.testing.assert_array_equal(got, _ggml_swiglu(gate, up))  # NaNs in the same places
    assert got[0] == 0.0 and got[1] == 0.0 and got[3] == 0.0 and got[6] == 200.0  # saturates
    assert got[7] == np.inf and np.isnan(got[8]) and np.isnan(got[9])  # inf; -inf / inf; NaN


def test_auto_uses_the_kernel_on_cpu() -> None:
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU kernel path is chosen on the CPU backend only")
    gate, up = _case((2, 1536), seed=2)
    hlo = jax.jit(lambda g, u: ops.gated("silu", g, u)).lower(gate, up).as_text()
    assert cpu.SWIGLU_TARGET in hlo
    gelu = jax.jit(lambda g, u: ops.gated("gelu_tanh", g, u)).lower(gate, up).as_text()
    assert cpu.SWIGLU_TARGET not in gelu


def test_checks_its_inputs() -> None:
    with pytest.raises(ValueError, match="one shape"):
        cpu.swiglu(jnp.zeros((2, 16)), jnp.zeros((2, 17)))
    with pytest.raises(ValueError, match="unknown activation"):
        ops.gated("relu", jnp.zeros(4), jnp.zeros(4))
