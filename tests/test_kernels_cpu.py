"""kernels.cpu: the packed-weight CPU matmul (XLA FFI custom call) against the jnp reference.

The kernel quantizes activation rows to 8 bits per block of 32 (as llama.cpp's
quantize_row_q8_0 does) and multiplies integers, so it is checked two ways:

* against `dequant_matmul_reference` with a bound derived from that rounding:
  |x - x_hat| <= d / 2 = max|x_block| / 254 per element, so the error of output
  (c, n) is at most sum over blocks b of max|x[c, b]| / 254 * sum_{i in b} |w[n, i]|;
* against a numpy emulation of the same integer scheme (activation codes computed
  bit for bit), where only f32 accumulation differs (about 1e-7 measured): a
  tolerance of 1e-6 relative to |x_hat| @ |w|.T, which one activation or weight
  code off by one already breaks.

Both checks are shown to reject corrupted weight decodings (nibble order, an
off-by-one block, a scale taken from the wrong block).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import cpu, ops
from kernels.cpu import build
from kernels.matmul import dequant_matmul_reference
from kernels.qtensor import QuantTensor, stack
from kernels.quant_types import FORMATS, GGMLType, quant_format
from tests.quant_blocks import F16_FIELDS, random_blocks

REPO_ROOT = Path(__file__).resolve().parents[1]
SUPPORTED = sorted(cpu.SUPPORTED)
needs_kernel = pytest.mark.skipif(not cpu.available(), reason=f"{cpu.unavailable_reason()}")
needs_panels = pytest.mark.skipif(
    not cpu.panels_available(), reason="the panels layout needs the AVX-512 VNNI or AVX2 build of kernels.cpu"
)

# (m, n, k) per test case: every m in (1, 3, 8, 16, 64, 70, 136, 300) (one tile from the
# registers, whole tiles from the registers in turn, and buffered), n off the 16-row panel size,
# k = 256 .. 2048 (the K-quants only take multiples of 256).
_SHAPES_32 = [
    (1, 45, 576),
    (3, 16, 640),
    (8, 33, 1536),
    (16, 40, 576),
    (64, 100, 2048),
    (70, 19, 256),
    (136, 17, 256),
    (300, 21, 256),
]
_SHAPES_256 = [
    (1, 45, 256),
    (3, 16, 1536),
    (8, 33, 2048),
    (16, 40, 512),
    (64, 100, 256),
    (70, 19, 256),
    (136, 17, 256),
    (300, 21, 1536),
]


def _shapes(qtype: int) -> list[tuple[int, int, int]]:
    return _SHAPES_256 if FORMATS[qtype].block_size == 256 else _SHAPES_32


def _weight(qtype: int, n: int, k: int, seed: int) -> QuantTensor:
    blocks = random_blocks(qtype, rows=n, blocks=k // FORMATS[qtype].block_size, seed=seed, scale=0.05)
    return QuantTensor.from_packed(blocks, qtype, (n, k))


def _activations(m: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.1, 3.0, (m, 1)).astype(np.float32)
    if m > 1:
        x[1] = 0.0  # an all-zero row: its blocks have scale 0
    return x


def _quantize_like_kernel(x: np.ndarray) -> np.ndarray:
    """x_hat: the activations as the kernel's 8-bit codes times their scales (f64)."""
    blocks = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    d = amax / np.float32(127)
    inverse = np.where(amax != 0, np.float32(127) / np.where(amax != 0, amax, 1), 0).astype(np.float32)
    codes = np.rint(blocks * inverse)  # f32 product rounded half to even, as vcvtps2dq
    assert np.abs(codes).max() <= 127
    return (codes.astype(np.float64) * d.astype(np.float64)).reshape(x.shape)


def _rounding_bound(x: np.ndarray, dense: np.ndarray) -> np.ndarray:
    """Largest |kernel - reference| that 8-bit activation rounding allows, plus f32 slack."""
    m, k = x.shape
    half_step = np.abs(x.astype(np.float64)).reshape(m, k // 32, 32).max(axis=-1) / 254
    row_mass = np.abs(dense.astype(np.float64)).reshape(dense.shape[0], k // 32, 32).sum(axis=-1)
    f32_slack = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(dense).T.astype(np.float64))
    return 1.01 * half_step @ row_mass.T + f32_slack + 1e-30


def _within_rounding_bound(got: np.ndarray, x: np.ndarray, dense: np.ndarray) -> bool:
    reference = x.astype(np.float64) @ dense.T.astype(np.float64)
    return bool(np.all(np.abs(got - reference) <= _rounding_bound(x, dense)))


def _matches_integer_scheme(got: np.ndarray, x: np.ndarray, dense: np.ndarray) -> bool:
    x_hat = _quantize_like_kernel(x)
    emulated = x_hat @ dense.T.astype(np.float64)
    tolerance = 1e-6 * (np.abs(x_hat) @ np.abs(dense).T.astype(np.float64)) + 1e-30
    return bool(np.all(np.abs(got - emulated) <= tolerance))


@needs_kernel
@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda q: FORMATS[q].name)
def test_matches_reference_within_activation_rounding(qtype: int) -> None:
    for index, (m, n, k) in enumerate(_shapes(qtype)):
        w = _weight(qtype, n, k, seed=index)
        x = _activations(m, k, seed=100 + index)
        got = np.asarray(cpu.qmatmul(x, w))
        reference = np.asarray(dequant_matmul_reference(x, w))
        dense = np.asarray(w.dequantize())
        assert got.shape == (m, n)
        assert _within_rounding_bound(got, x, dense), f"{FORMATS[qtype].name} m={m} n={n} k={k}"
        # The bound is no looser than the rounding it allows for.
        np.testing.assert_allclose(got, reference, rtol=0, atol=float(_rounding_bound(x, dense).max()))
        if m > 1:
            np.testing.assert_array_equal(got[1], 0.0)


@needs_kernel
@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda q: FORMATS[q].name)
def test_matches_the_integer_scheme(qtype: int) -> None:
    for index, (m, n, k) in enumerate(_shapes(qtype)):
        w = _weight(qtype, n, k, seed=200 + index)
        x = _activations(m, k, seed=300 + index)
        got = np.asarray(cpu.qmatmul(x, w))
        assert _matches_integer_scheme(got, x, np.asarray(w.dequantize())), (
            f"{FORMATS[qtype].name} m={m} k={k}"
        )


@needs_kernel
@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda q: FORMATS[q].name)
def test_a_products_bits_do_not_depend_on_the_rows_beside_it(qtype: int) -> None:
    """A batched row gets the bits of its lone run, and a weight row the same bits wherever
    it stands in the matrix (the portable kernel pairs weight rows, the AVX-512 kernel
    takes them 16 at a time): what keeps batched decoding and the prefix cache exact.
    Eight rows are one tile, whose blocks the threads quantize in ranges (a decode
    step's); eleven are two tiles, quantized whole, multiplied from decoded buffers;
    sixteen are two whole tiles, each multiplied from the registers in turn."""
    n, k = 45, 512 if FORMATS[qtype].block_size == 256 else 576
    blocks = random_blocks(qtype, rows=n, blocks=k // FORMATS[qtype].block_size, seed=7, scale=0.05)
    x = _activations(16, k, seed=8)
    weight = QuantTensor.from_packed(blocks, qtype, (n, k))
    tile = np.asarray(cpu.qmatmul(x[:8], weight))
    buffered = np.asarray(cpu.qmatmul(x[:11], weight))
    tiles = np.asarray(cpu.qmatmul(x, weight))
    for row in (0, 3, 4, 7, 8, 10, 11, 15):
        alone = np.asarray(cpu.qmatmul(x[row : row + 1], weight))
        np.testing.assert_array_equal(alone[0], tiles[row])
        if row < 11:
            np.testing.assert_array_equal(alone[0], buffered[row])
        if row < 8:
            np.testing.assert_array_equal(alone[0], tile[row])
    for start in (1, 43, 44):
        rest = QuantTensor.from_packed(np.ascontiguousarray(blocks[start:]), qtype, (n - start, k))
        np.testing.assert_array_equal(np.asarray(cpu.qmatmul(x, rest)), tiles[:, start:])
        np.testing.assert_array_equal(np.asarray(cpu.qmatmul(x[:11], rest)), buffered[:, start:])


def _swap_nibbles(data: np.ndarray, qtype: int) -> np.ndarray:
    """Every byte's nibbles exchanged outside the f16 fields: a wrong nibble order."""
    fmt = quant_format(qtype)
    blocks = data.reshape(data.shape[0], -1, fmt.block_bytes).copy()
    keep = blocks.copy()
    blocks[:] = (blocks << 4) | (blocks >> 4)
    for offset in F16_FIELDS[qtype]:
        blocks[..., offset : offset + 2] = keep[..., offset : offset + 2]
    return blocks.reshape(data.shape)


def _shift_blocks(data: np.ndarray, qtype: int) -> np.ndarray:
    """Each row's blocks rotated by one: an off-by-one block index."""
    fmt = quant_format(qtype)
    return np.roll(data.reshape(data.shape[0], -1, fmt.block_bytes), 1, axis=1).reshape(data.shape)


def _scale_of_next_block(data: np.ndarray, qtype: int) -> np.ndarray:
    """The first f16 scale of every block taken from the next block."""
    fmt = quant_format(qtype)
    blocks = data.reshape(data.shape[0], -1, fmt.block_bytes).copy()
    offset = F16_FIELDS[qtype][0]
    blocks[..., offset : offset + 2] = np.roll(blocks[..., offset : offset + 2], -1, axis=1)
    return blocks.reshape(data.shape)


@needs_kernel
@pytest.mark.parametrize(
    "qtype", [GGMLType.Q4_1, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K], ids=lambda q: q.name
)
@pytest.mark.parametrize("corrupt", [_swap_nibbles, _shift_blocks, _scale_of_next_block])
def test_checks_reject_a_corrupted_decode(qtype: int, corrupt) -> None:
    """A kernel that decoded the weights like `corrupt` would fail both checks above."""
    m, n, k = 3, 40, 512
    w = _weight(qtype, n, k, seed=7)
    x = _activations(m, k, seed=8)
    got = np.asarray(cpu.qmatmul(x, w))
    dense = np.asarray(w.dequantize())
    assert _within_rounding_bound(got, x, dense) and _matches_integer_scheme(got, x, dense)
    wrong = QuantTensor.from_packed(corrupt(np.asarray(w.data), qtype), qtype, (n, k))
    wrong_dense = np.asarray(wrong.dequantize())
    assert not np.array_equal(wrong_dense, dense)
    assert not _within_rounding_bound(got, x, wrong_dense)
    assert not _matches_integer_scheme(got, x, wrong_dense)


@needs_kernel
def test_runs_under_jit_with_traced_weights() -> None:
    w = _weight(GGMLType.Q4_K, 48, 512, seed=11)
    x = _activations(5, 512, seed=12)
    traced = jax.jit(lambda x, w: cpu.qmatmul(x * 2.0, w))(x, w)
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(cpu.qmatmul(x * 2.0, w)))


@needs_kernel
def test_runs_in_a_scan_over_stacked_layers() -> None:
    layers = [_weight(GGMLType.Q5_0, 32, 640, seed=seed) for seed in range(3)]
    x = _activations(2, 640, seed=13)

    def step(carry, w):
        assert isinstance(w, QuantTensor) and w.data.shape == (32, layers[0].data.shape[1])
        return carry, ops.matmul(carry, w, impl="cpu")

    _, outs = jax.jit(lambda x, ws: jax.lax.scan(step, x, ws))(x, stack(layers))
    for index, w in enumerate(layers):
        np.testing.assert_array_equal(np.asarray(outs[index]), np.asarray(cpu.qmatmul(x, w)))


@needs_kernel
def test_concurrent_callers_get_their_own_results() -> None:
    """Calls from several threads at once (the pool runs one, the rest run inline)."""
    w = _weight(GGMLType.Q8_0, 200, 1024, seed=14)
    inputs = [_activations(1 + i % 3, 1024, seed=20 + i) for i in range(6)]
    expected = [np.asarray(cpu.qmatmul(x, w)) for x in inputs]
    product = jax.jit(cpu.qmatmul)
    failures: list[str] = []

    def worker(index: int) -> None:
        for _ in range(20):
            if not np.array_equal(np.asarray(product(inputs[index], w)), expected[index]):
                failures.append(f"thread {index}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


@needs_kernel
@pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="auto picks the CPU kernel only on the CPU backend"
)
def test_auto_picks_the_kernel_on_cpu() -> None:
    w = _weight(GGMLType.Q6_K, 24, 256, seed=15)
    x = _activations(6, 256, seed=16).reshape(2, 3, 256)
    lowered = jax.jit(lambda x, w: ops.matmul(x, w)).lower(x, w).as_text()
    assert cpu.FFI_TARGET in lowered
    out = ops.matmul(x, w)
    assert out.shape == (2, 3, 24)
    np.testing.assert_array_equal(
        np.asarray(out).reshape(6, 24), np.asarray(cpu.qmatmul(x.reshape(6, 256), w))
    )
    dense = np.ones((24, 256), np.float32)
    assert cpu.FFI_TARGET not in jax.jit(lambda x: ops.matmul(x, dense)).lower(x).as_text()


@pytest.mark.parametrize("impl", ["auto", "cpu"])
@pytest.mark.parametrize("qtype", [GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.F16], ids=lambda q: q.name)
def test_unsupported_types_fall_back_to_the_reference(qtype: int, impl: str) -> None:
    if impl == "cpu" and not cpu.available():
        pytest.skip(f"impl='cpu' needs the kernel: {cpu.unavailable_reason()}")
    assert not cpu.supports(qtype)
    if qtype == GGMLType.F16:
        values = np.random.default_rng(17).standard_normal((8, 64)).astype(np.float16)
        w = QuantTensor.from_packed(values.view(np.uint8), qtype, (8, 64))
    else:
        w = QuantTensor.from_packed(random_blocks(qtype, rows=8, blocks=1, seed=17), qtype, (8, 256))
    x = np.random.default_rng(18).standard_normal((3, w.in_features)).astype(np.float32)
    call = jax.jit(lambda x, w: ops.matmul(x, w, impl=impl))
    assert cpu.FFI_TARGET not in call.lower(x, w).as_text()
    np.testing.assert_allclose(np.asarray(call(x, w)), np.asarray(dequant_matmul_reference(x, w)), rtol=1e-6)


@needs_kernel
def test_qmatmul_checks_its_inputs() -> None:
    w = _weight(GGMLType.Q8_0, 8, 64, seed=19)
    with pytest.raises(ValueError, match=r"x must be f32\[m, 64\]"):
        cpu.qmatmul(np.ones((2, 32), np.float32), w)
    with pytest.raises(ValueError, match="index stacked layers first"):
        cpu.qmatmul(np.ones((2, 64), np.float32), stack([w, w]))
    q2 = QuantTensor.from_packed(
        random_blocks(GGMLType.Q2_K, rows=2, blocks=1, seed=0), GGMLType.Q2_K, (2, 256)
    )
    with pytest.raises(ValueError, match="does not support Q2_K"):
        cpu.qmatmul(np.ones((1, 256), np.float32), q2)
    assert ops.matmul(np.ones((0, 64), np.float32), w).shape == (0, 8)


@needs_kernel
@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda q: FORMATS[q].name)
@pytest.mark.parametrize("m", [1, 8, 64])
@pytest.mark.parametrize("panels", [False, pytest.param(True, marks=needs_panels)], ids=["rows", "panels"])
def test_one_call_over_several_weights_equals_one_call_each(qtype: int, m: int, panels: bool) -> None:
    """A layer's q, k and v (different heights) in one call: each product bit for bit
    what its own call gives, in either layout; ops.matmuls groups them only then."""
    k = 512 if FORMATS[qtype].block_size == 256 else 576
    ws = [_weight(qtype, n, k, seed=40 + n) for n in (48, 16, 32)]
    if panels:
        ws = [w.to_panels() for w in ws]
    x = jnp.asarray(_activations(m, k, seed=m))
    together = jax.jit(cpu.qmatmuls)(x, ws)
    for w, got in zip(ws, together, strict=True):
        alone = np.asarray(jax.jit(cpu.qmatmul)(x, w))
        assert got.shape == (m, w.out_features)
        np.testing.assert_array_equal(np.asarray(got), alone)
    grouped = jax.jit(lambda x, ws: ops.matmuls(x[None], ws, impl="cpu"))(x, ws)
    for w, got in zip(ws, grouped, strict=True):
        np.testing.assert_array_equal(np.asarray(got)[0], np.asarray(cpu.qmatmul(x, w)))


@needs_kernel
@pytest.mark.parametrize("qtype", [GGMLType.Q4_1, GGMLType.Q8_0, GGMLType.Q4_K], ids=lambda q: q.name)
@pytest.mark.parametrize("m", [1, 8, 64])
@pytest.mark.parametrize("panels", [False, pytest.param(True, marks=needs_panels)], ids=["rows", "panels"])
def test_a_residual_added_as_stored_equals_adding_afterwards(qtype: int, m: int, panels: bool) -> None:
    """A layer's output projection with its residual: the kernel adds it as it stores the
    product, the same f32 sums bit for bit as an add afterwards, on the register path
    (m <= 8) and the panel-buffer path, whose k of 1536 takes three passes of 512."""
    k = 1536
    ws = [_weight(qtype, n, k, seed=60 + n) for n in (32, 16)]
    if panels:
        ws = [w.to_panels() for w in ws]
    x = jnp.asarray(_activations(m, k, seed=m + 1))
    rng = np.random.default_rng(m)
    adds = [jnp.asarray(rng.standard_normal((m, w.out_features)).astype(np.float32) * 10) for w in ws]
    got = jax.jit(cpu.qmatmuls)(x, ws, adds)
    for w, a, out in zip(ws, adds, got, strict=True):
        np.testing.assert_array_equal(np.asarray(out), np.asarray(cpu.qmatmul(x, w)) + np.asarray(a))
    hidden = adds[0].reshape(1, m, -1)
    fused = jax.jit(lambda x, w, h: ops.matmul(x, w, add=h, impl="cpu"))(x[None], ws[0], hidden)
    np.testing.assert_array_equal(
        np.asarray(fused), np.asarray(cpu.qmatmul(x, ws[0]))[None] + np.asarray(hidden)
    )
    reference = ops.matmul(x, ws[0], add=adds[0], impl="reference")
    np.testing.assert_array_equal(
        np.asarray(reference), np.asarray(ops.matmul(x, ws[0], impl="reference")) + np.asarray(adds[0])
    )
    with pytest.raises(ValueError, match="adds must be f32 of the products' shapes"):
        cpu.qmatmuls(x, ws, adds[:1])


@needs_kernel
def test_weights_of_other_types_go_in_calls_of_their_own() -> None:
    """Gemma 3 mixes types within a layer (attn_v Q8_0 beside Q5_0 q and k): ops.matmuls
    splits the run where the type changes, and qmatmuls refuses a mixed set."""
    q = _weight(GGMLType.Q5_0, 32, 256, seed=1)
    k = _weight(GGMLType.Q5_0, 16, 256, seed=2)
    v = _weight(GGMLType.Q8_0, 16, 256, seed=3)
    x = _activations(3, 256, seed=4)
    assert cpu.can_share_call([q, k]) and not cpu.can_share_call([q, k, v])
    assert not cpu.can_share_call([q, q.to_panels()])  # one layout per call
    with pytest.raises(ValueError, match="one type, layout and input width"):
        cpu.qmatmuls(x, [q, v])
    got = ops.matmuls(x, [q, k, v], impl="cpu")
    for w, out in zip((q, k, v), got, strict=True):
        np.testing.assert_array_equal(np.asarray(out), np.asarray(cpu.qmatmul(x, w)))
    # Plain arrays and the reference path: one product each, the same values as matmul.
    dense = np.asarray(q.dequantize())
    for w in ([dense, dense], [q, k]):
        for out, weight in zip(ops.matmuls(x, w, impl="reference"), w, strict=True):
            np.testing.assert_array_equal(
                np.asarray(out), np.asarray(ops.matmul(x, weight, impl="reference"))
            )


def test_build_reports_a_missing_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "find_compiler", lambda: None)
    assert build.build() is None
    with pytest.raises(build.BuildError, match="no C\\+\\+ compiler"):
        build.build_or_raise()


@pytest.mark.parametrize("value", ["skylake; rm -rf ~", "x86-64 -O0"])
def test_build_refuses_a_cpu_arch_that_is_not_a_march_value(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    # The variable ends up on the compiler's command line: anything but a -march word is
    # refused, and named, before a compiler runs.
    monkeypatch.setenv(build.ARCH_VARIABLE, value)
    monkeypatch.setattr(build, "_compile", lambda *args: pytest.fail("compiled an invalid -march"))
    with pytest.raises(build.BuildError, match=f"{build.ARCH_VARIABLE}=.*is not a -march value"):
        build.build_or_raise()
    assert build.build() is None  # the engine then keeps XLA, with the reason logged


@pytest.mark.skipif(build.find_compiler() is None, reason="no C++ compiler")
def test_build_reports_a_cpu_arch_the_compiler_does_not_know(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(build.ARCH_VARIABLE, "no-such-cpu")
    monkeypatch.setattr(build, "BUILD_DIR", tmp_path)
    with pytest.raises(build.BuildError, match="no-such-cpu"):
        build.build_or_raise()
    assert not list(tmp_path.iterdir())  # no library, no temporary file left behind


@needs_kernel
def test_build_entry_point_prints_the_cached_library() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kernels.cpu.build"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    path = Path(result.stdout.strip())
    assert "Warning" not in result.stderr  # the module runs once: not imported by its package first
    assert (
        path.is_file()
        and path.parent == build.BUILD_DIR
        and path == build.library_path(build.find_compiler())
    )


def test_kernel_inputs_stay_f32() -> None:
    """ops.matmul hands the kernel f32 activations whatever the caller's dtype."""
    if not cpu.available():
        pytest.skip(f"needs the kernel: {cpu.unavailable_reason()}")
    w = _weight(GGMLType.Q4_0, 16, 64, seed=21)
    x = jnp.ones((2, 64), jnp.bfloat16)
    out = ops.matmul(x, w, impl="cpu")
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), np.asarray(cpu.qmatmul(np.ones((2, 64), np.float32), w)))


@needs_kernel
def test_nan_activations_give_nan_rows() -> None:
    """A NaN in a row's activations makes that row's outputs NaN, as the reference's are."""
    w = _weight(GGMLType.Q4_1, 20, 256, seed=22)
    x = _activations(3, 256, seed=23)
    x[2, 100] = np.nan
    got = np.asarray(cpu.qmatmul(x, w))
    assert np.isnan(got[2]).all() and np.isfinite(got[[0, 1]]).all()
    # Eight rows of 1024: one tile, its blocks quantized in ranges; the NaN in the last.
    w = _weight(GGMLType.Q4_1, 20, 1024, seed=24)
    x = _activations(8, 1024, seed=25)
    x[5, 1000] = np.nan
    got = np.asarray(cpu.qmatmul(x, w))
    assert np.isnan(got[5]).all() and np.isfinite(np.delete(got, 5, axis=0)).all()


@needs_kernel
def test_the_build_names_its_kernels_and_arrange_follows_them() -> None:
    """The AVX-512 VNNI build holds every kernel and reads panels; the AVX2 build reads
    panels with norms and SwiGLU left to jnp; the portable build (any other CPU) holds
    the matmul alone, reads the GGUF's rows, and the engine keeps them so (a panels
    weight gets a clear error instead of wrong products)."""
    w = _weight(GGMLType.Q4_1, 32, 256, seed=21)
    x = _activations(2, 256, seed=22)
    if cpu.isa() in ("avx512-vnni", "avx2"):
        assert cpu.panels_available()
        assert cpu.fused_available() == (cpu.isa() == "avx512-vnni")
        assert ops.arrange(w, impl="cpu").layout == "panels"
        if cpu.isa() == "avx2":
            with pytest.raises(RuntimeError, match="need AVX-512 VNNI"):
                cpu.rms_norm(x, np.ones(256, np.float32), 1e-6)
        return
    assert cpu.isa() == "portable" and not cpu.fused_available() and not cpu.panels_available()
    assert ops.arrange(w, impl="cpu") is w
    assert cpu.FFI_TARGET in jax.jit(lambda x: ops.matmul(x, w, impl="cpu")).lower(x).as_text()
    with pytest.raises(ValueError, match="portable CPU kernel reads the GGUF's rows"):
        cpu.qmatmul(x, w.to_panels())
    with pytest.raises(RuntimeError, match="need AVX-512 VNNI"):
        cpu.rms_norm(x, np.ones(256, np.float32), 1e-6)
