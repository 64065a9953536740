"""kernels.ops entry points, the QuantTensor pytree, and the package's import boundary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType

import kernels
from kernels import ops
from kernels.qtensor import QuantTensor, stack
from kernels.quant_types import GGMLType

REPO_ROOT = Path(__file__).resolve().parents[1]


def _q8_weight(rows: int, cols: int, seed: int) -> tuple[QuantTensor, np.ndarray]:
    """A Q8_0 QuantTensor quantized by gguf-py, and its gguf-py dequantization."""
    values = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    packed = gguf.quants.quantize(values, GGMLQuantizationType.Q8_0)
    dense = gguf.quants.dequantize(packed, GGMLQuantizationType.Q8_0)
    return QuantTensor.from_packed(packed, GGMLType.Q8_0, (rows, cols)), dense


def test_quant_tensor_is_a_pytree_with_one_leaf() -> None:
    w, _ = _q8_weight(8, 64, seed=0)
    leaves, treedef = jax.tree_util.tree_flatten(w)
    assert len(leaves) == 1 and leaves[0].dtype == jnp.uint8
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (rebuilt.qtype, rebuilt.shape) == (GGMLType.Q8_0, (8, 64))


def test_quant_tensor_crosses_jit() -> None:
    w, dense = _q8_weight(8, 64, seed=1)
    out = jax.jit(lambda t: t.dequantize())(w)
    np.testing.assert_allclose(np.asarray(out), dense, rtol=1e-6)


def test_from_packed_checks_sizes() -> None:
    w, _ = _q8_weight(8, 64, seed=2)
    with pytest.raises(ValueError, match=r"needs data u8\[\.\.\., 8, 68\]"):
        QuantTensor.from_packed(w.data[:, :60], GGMLType.Q8_0, (8, 64))
    with pytest.raises(ValueError, match="not supported"):
        QuantTensor.from_packed(w.data, 16, (8, 64))


def test_stack_feeds_scan_one_layer_per_step() -> None:
    layers = [_q8_weight(16, 64, seed=seed) for seed in range(3)]
    stacked = stack([w for w, _ in layers])
    assert stacked.data.shape == (3, 16, 68) and stacked.shape == (16, 64)
    x = np.random.default_rng(9).standard_normal((2, 64)).astype(np.float32)

    def step(carry, w):
        assert isinstance(w, QuantTensor) and w.data.shape == (16, 68)
        return carry, ops.matmul(carry, w, impl="reference")

    _, outs = jax.jit(lambda xs, ws: jax.lax.scan(step, xs, ws))(x, stacked)
    for index, (_, dense) in enumerate(layers):
        np.testing.assert_allclose(np.asarray(outs[index]), x @ dense.T, rtol=1e-5, atol=1e-5)


def test_stack_rejects_mismatched_tensors() -> None:
    a, _ = _q8_weight(16, 64, seed=0)
    b, _ = _q8_weight(8, 64, seed=0)
    with pytest.raises(ValueError, match="cannot stack tensor 1"):
        stack([a, b])
    f32 = QuantTensor.from_packed(np.zeros((16, 256), np.uint8), GGMLType.F32, (16, 64))
    with pytest.raises(ValueError, match=r"cannot stack tensor 1 \(F32"):
        stack([a, f32])
    with pytest.raises(ValueError, match="at least one"):
        stack([])


def test_matmul_plain_array_is_gguf_oriented() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 24)).astype(np.float32)
    w = rng.standard_normal((10, 24)).astype(np.float32)  # (out, in)
    out = ops.matmul(x, w)
    assert out.shape == (2, 3, 10)
    np.testing.assert_allclose(np.asarray(out), x @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["auto", "reference", "pallas_interpret"])
def test_matmul_quant_tensor_matches_gguf_dequantization(impl: str) -> None:
    w, dense = _q8_weight(40, 96, seed=5)
    x = np.random.default_rng(6).standard_normal((2, 3, 96)).astype(np.float32)
    out = jax.jit(lambda x, w: ops.matmul(x, w, impl=impl))(x, w)
    assert out.shape == (2, 3, 40)
    if impl == "auto" and jax.default_backend() == "cpu":
        # The CPU kernel multiplies 8-bit activations (as llama.cpp does): each product is
        # within a small fraction of the sum of the terms' magnitudes.
        bound = 2e-2 * (np.abs(x) @ np.abs(dense).T)
        assert (np.abs(np.asarray(out) - x @ dense.T) <= bound).all()
    else:
        np.testing.assert_allclose(np.asarray(out), x @ dense.T, rtol=1e-5, atol=1e-4)


def test_auto_uses_the_reference_off_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    if jax.default_backend() == "gpu":
        pytest.skip("auto picks the Pallas kernels on GPU")

    def forbidden(*args, **kwargs):
        raise AssertionError("auto chose a Pallas kernel off GPU")

    monkeypatch.setattr(ops, "dequant_matmul", forbidden)
    monkeypatch.setattr(ops, "pallas_attention", forbidden)
    w, dense = _q8_weight(8, 64, seed=7)
    x = np.ones((1, 64), np.float32)
    np.testing.assert_allclose(np.asarray(ops.matmul(x, w)), x @ dense.T, rtol=1e-5)
    q = jnp.ones((1, 1, 2, 16))
    kv = jnp.ones((1, 4, 2, 16))
    out = ops.attention(q, kv, kv, jnp.array([[3]]), jnp.array([4]), scale=0.25)
    np.testing.assert_allclose(np.asarray(out), 1.0, rtol=1e-6)


def test_ops_reject_bad_arguments() -> None:
    w, _ = _q8_weight(8, 64, seed=8)
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.matmul(np.ones((1, 64), np.float32), w, impl="triton")
    with pytest.raises(ValueError, match="does not fit a single weight"):
        ops.matmul(np.ones((1, 32), np.float32), w)
    with pytest.raises(ValueError, match="does not fit a single weight"):
        ops.matmul(np.ones((1, 64), np.float32), stack([w, w]))
    with pytest.raises(ValueError, match=r"does not fit a weight f32\[out, in\]"):
        ops.matmul(np.ones((1, 32), np.float32), np.ones((8, 64), np.float32))


@pytest.mark.parametrize("steps", [5, 1], ids=["prefill", "decode"])
def test_attention_pallas_interpret_matches_reference(steps: int) -> None:
    rng = np.random.default_rng(10)
    q = rng.standard_normal((1, steps, 4, 16)).astype(np.float32)
    k = rng.standard_normal((1, 16, 2, 16)).astype(np.float32)
    v = rng.standard_normal((1, 16, 2, 16)).astype(np.float32)
    args = (q, k, v, jnp.arange(3, 3 + steps)[None, :], jnp.array([3 + steps]))
    want = ops.attention(*args, scale=0.25, sliding_window=3, impl="reference")
    got = ops.attention(*args, scale=0.25, sliding_window=3, impl="pallas_interpret")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_package_imports_neither_gguf_nor_swarm() -> None:
    code = (
        "import sys, kernels, kernels.ops, kernels.matmul, kernels.attention\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('gguf', 'swarm'))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_package_exports() -> None:
    assert kernels.ops is ops
    assert kernels.QuantTensor is QuantTensor
    assert callable(kernels.dequantize) and callable(kernels.row_bytes)
