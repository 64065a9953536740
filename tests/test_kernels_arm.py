"""The CPU kernels as ARM machines run them, executed on an emulated ARM CPU.

ARM machines (Graviton, Ampere, Apple silicon under Linux, Raspberry Pi 5) run the
portable kernels: the matmul of kernels/cpu/portable.h in plain C++, with `sdot` where
the CPU has the dot-product extension, and the portable cache attention.  This machine
is not ARM, so the kernels are cross-compiled, with a small driver in place of XLA
(tests/kernel_driver), into a static ARM program that qemu's user-mode emulator runs:
the same sources, the same compiler flags as the library, ARM's own instructions.

The checks are those the x86 builds pass (tests/test_kernels_cpu.py and
tests/test_kernels_cpu_attention.py): every format's product against the integer
scheme (1e-6) and within the activation rounding of the f64 reference, a row's bits
independent of the rows beside it and of where its weight row stands, the kernel's
error for a malformed weight, and attention against the jnp reference (1e-5 of the
largest value) for f16 and f32 caches, decode steps and prompt chunks, sliding
windows, the soft cap and rows that see nothing.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import ops
from kernels.attention import NO_WINDOW
from kernels.cpu import SUPPORTED, build
from kernels.quant_types import FORMATS
from tests.quant_blocks import random_blocks
from tests.test_kernels_cpu import (
    _activations,
    _matches_integer_scheme,
    _shapes,
    _weight,
    _within_rounding_bound,
)
from tests.test_kernels_cpu_attention import written_by_xla

REPO_ROOT = Path(__file__).resolve().parents[1]
DRIVER_SOURCES = sorted((REPO_ROOT / "tests" / "kernel_driver").glob("*.cc"))
ARM_COMPILER = "aarch64-linux-gnu-g++"
EMULATOR = "qemu-aarch64"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which(ARM_COMPILER) is None, reason=f"no {ARM_COMPILER} (Debian's g++-aarch64-linux-gnu)"
    ),
    pytest.mark.skipif(shutil.which(EMULATOR) is None, reason=f"no {EMULATOR} (Debian's qemu-user)"),
]


class ArmKernels:
    """The driver built for one ARM -march, run under the emulator."""

    def __init__(self, program: Path, arch: str):
        self.program = program
        self.arch = arch

    def run(self, records: list[bytes], workdir: Path) -> list[tuple[int, bytes]]:
        """Each record's (status, payload): the result's bytes, or the error message."""
        requests, outputs = workdir / "requests.bin", workdir / "outputs.bin"
        requests.write_bytes(b"".join(records))
        # -cpu max: an ARMv8 CPU with every extension qemu emulates (dotprod, fp16).
        result = subprocess.run(
            [EMULATOR, "-cpu", "max", str(self.program), str(requests), str(outputs)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        data, at, answers = outputs.read_bytes(), 0, []
        for record in records:
            (status,) = struct.unpack_from("<q", data, at)
            at += 8
            if status == 0:
                size = _result_bytes(record)
                answers.append((0, data[at : at + size]))
                at += size
            else:
                (length,) = struct.unpack_from("<q", data, at)
                answers.append((status, data[at + 8 : at + 8 + length]))
                at += 8 + length
        assert at == len(data), "the driver wrote more than the records asked for"
        return answers


def _result_bytes(record: bytes) -> int:
    kind = struct.unpack_from("<q", record)[0]
    if kind == 1:
        _, m, _, n, _ = struct.unpack_from("<5q", record, 8)
        return 4 * m * n
    batch, steps, q_heads, head_dim, value_dim, rows, capacity, kv_heads = struct.unpack_from(
        "<8q", record, 8
    )
    out = 4 * batch * steps * q_heads * value_dim
    if kind == 2:
        return out
    layers, half = struct.unpack_from("<2q", record, 8 + 8 * 12)
    # The caches as written come back after the attention.
    return out + (2 if half else 4) * layers * rows * capacity * kv_heads * (head_dim + value_dim)


@pytest.fixture(scope="module", params=["armv8-a", "armv8.2-a+dotprod+fp16"])
def arm(request, tmp_path_factory) -> ArmKernels:
    """The driver, compiled as the library is (build.FLAGS less -shared and -fPIC) for
    a baseline ARMv8 CPU, and for one with the dot-product and half-float extensions."""
    arch = request.param
    program = tmp_path_factory.mktemp("arm") / "kernels"
    flags = [flag for flag in build.FLAGS if flag not in ("-shared", "-fPIC")]
    command = [
        ARM_COMPILER,
        *flags,
        f"-march={arch}",
        "-static",
        "-pthread",
        "-isystem",
        jax.ffi.include_dir(),
        "-I",
        str(build.SOURCE_DIR),
        *map(str, DRIVER_SOURCES),
        "-o",
        str(program),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=build.COMPILE_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    return ArmKernels(program, arch)


def _matmul_record(qtype: int, x: np.ndarray, packed: np.ndarray) -> bytes:
    m, k = x.shape
    n, row_bytes = packed.shape
    header = struct.pack("<6q", 1, qtype, m, k, n, row_bytes)
    return header + np.ascontiguousarray(x, np.float32).tobytes() + np.ascontiguousarray(packed).tobytes()


def _as_rows(payload: bytes, m: int, n: int) -> np.ndarray:
    return np.frombuffer(payload, np.float32).reshape(m, n)


def test_every_format_matches_the_integer_scheme(arm: ArmKernels, tmp_path: Path) -> None:
    cases, records = [], []
    for qtype in SUPPORTED:
        for index, (m, n, k) in enumerate(_shapes(qtype)):
            w = _weight(qtype, n, k, seed=400 + index)
            x = _activations(m, k, seed=500 + index)
            cases.append((qtype, m, n, k, x, np.asarray(w.dequantize())))
            records.append(_matmul_record(qtype, x, np.asarray(w.data)))
    answers = arm.run(records, tmp_path)
    for (qtype, m, n, k, x, dense), (status, payload) in zip(cases, answers, strict=True):
        label = f"{arm.arch} {FORMATS[qtype].name} m={m} n={n} k={k}"
        assert status == 0, (label, payload)
        got = _as_rows(payload, m, n)
        assert _matches_integer_scheme(got, x, dense), label
        assert _within_rounding_bound(got, x, dense), label
        if m > 1:
            np.testing.assert_array_equal(got[1], 0.0)  # the all-zero activation row


def test_a_products_bits_do_not_depend_on_the_rows_beside_it(arm: ArmKernels, tmp_path: Path) -> None:
    """As on x86: a batched row gets its lone run's bits, and a weight row the same bits
    wherever it stands (the portable kernel pairs weight rows)."""
    records, expected = [], []
    for qtype in SUPPORTED:
        n, k = 45, 512 if FORMATS[qtype].block_size == 256 else 576
        blocks = random_blocks(qtype, rows=n, blocks=k // FORMATS[qtype].block_size, seed=9, scale=0.05)
        x = _activations(11, k, seed=10)
        records.append(_matmul_record(qtype, x, blocks))
        expected.append(("full", qtype, None))
        for row in (0, 3, 4, 10):
            records.append(_matmul_record(qtype, x[row : row + 1], blocks))
            expected.append(("row", qtype, row))
        for start in (1, 43, 44):
            records.append(_matmul_record(qtype, x, blocks[start:]))
            expected.append(("from", qtype, start))
    answers = arm.run(records, tmp_path)
    full = None
    for (what, qtype, at), (status, payload) in zip(expected, answers, strict=True):
        assert status == 0, payload
        got = np.frombuffer(payload, np.float32)
        label = f"{arm.arch} {FORMATS[qtype].name} {what} {at}"
        if what == "full":
            full = got.reshape(11, 45)
        elif what == "row":
            np.testing.assert_array_equal(got, full[at], err_msg=label)
        else:
            np.testing.assert_array_equal(got.reshape(11, 45 - at), full[:, at:], err_msg=label)


def test_a_weight_of_the_wrong_width_is_refused(arm: ArmKernels, tmp_path: Path) -> None:
    qtype = sorted(SUPPORTED)[0]
    w = np.asarray(_weight(qtype, 16, 256, seed=1).data)
    x = _activations(2, 288, seed=2)  # 288 columns against rows of 256 elements
    ((status, message),) = arm.run([_matmul_record(qtype, x, w)], tmp_path)
    assert status == 1
    assert b"288 columns" in message


def _attention_record(
    q, keys, values, layer, first_row, positions, kv_length, *, window, bound, scale, softcap
):
    layers, rows, capacity, kv_heads, head_dim = keys.shape
    batch, steps, q_heads, _ = q.shape
    half = keys.dtype == np.float16
    shape = (batch, steps, q_heads, head_dim, values.shape[4], rows, capacity, kv_heads)
    header = struct.pack("<15q", 2, *shape, layer, first_row, window, bound, layers, int(half))
    return (
        header
        + struct.pack("<2f", scale, softcap)
        + np.ascontiguousarray(q, np.float32).tobytes()
        + np.ascontiguousarray(keys).tobytes()
        + np.ascontiguousarray(values).tobytes()
        + np.ascontiguousarray(positions, np.int32).tobytes()
        + np.ascontiguousarray(kv_length, np.int32).tobytes()
    )


def _attention_reference(
    q, keys, values, layer, first_row, positions, kv_length, *, window, bound, scale, softcap
):
    return np.asarray(
        ops.cache_attention(
            jnp.asarray(q),
            jnp.asarray(keys),
            jnp.asarray(values),
            jnp.int32(layer),
            jnp.int32(first_row),
            jnp.asarray(positions, jnp.int32),
            jnp.asarray(kv_length, jnp.int32),
            kv_bound=bound,
            scale=scale,
            sliding_window=None if window == NO_WINDOW else window,
            logit_softcap=softcap or None,
            impl="reference",
        )
    )


def _attention_cases():
    """(label, arguments) of decode steps and prompt chunks over small caches."""
    cases = []
    for dtype in (np.float16, np.float32):
        for dim, group, kv_heads in [(64, 3, 3), (256, 4, 1), (20, 1, 2), (40, 5, 2), (128, 8, 1)]:
            rng = np.random.default_rng(dim * 7 + group)
            shape = (2, 4, 96, kv_heads, dim)
            keys = rng.standard_normal(shape).astype(dtype)
            values = rng.standard_normal(shape).astype(dtype)
            q = rng.standard_normal((3, 1, kv_heads * group, dim)).astype(np.float32)
            positions, kv_length = np.asarray([[0], [37], [95]]), np.asarray([1, 38, 90])
            arguments = dict(window=NO_WINDOW, bound=96, scale=dim**-0.5, softcap=0.0)
            name = f"{np.dtype(dtype).name} d={dim} g={group} kv={kv_heads}"
            cases.append((name, (q, keys, values, 1, 1, positions, kv_length), arguments))
    rng = np.random.default_rng(11)
    keys = rng.standard_normal((1, 3, 96, 3, 64)).astype(np.float16)
    values = rng.standard_normal((1, 3, 96, 3, 64)).astype(np.float16)
    decode = rng.standard_normal((3, 1, 9, 64)).astype(np.float32)
    steps = [[10], [60], [80]], [11, 61, 81]
    for window in (1, 7, 64):
        arguments = dict(window=window, bound=64, scale=0.125, softcap=0.0)
        cases.append((f"window {window}", (decode, keys, values, 0, 0, *map(np.asarray, steps)), arguments))
    arguments = dict(window=NO_WINDOW, bound=96, scale=1.0, softcap=2.0)
    cases.append(("soft cap", (decode, keys, values, 0, 0, *map(np.asarray, steps)), arguments))
    # A batch wide enough that a thread takes whole sequences (every kv head) at a time.
    wide = rng.standard_normal((8, 1, 9, 64)).astype(np.float32)
    wide_cache = [rng.standard_normal((1, 9, 96, 3, 64)).astype(np.float16) for _ in range(2)]
    positions = rng.integers(0, 96, 8)
    kv_length = np.minimum(positions + 1, rng.integers(1, 97, 8))
    arguments = dict(window=NO_WINDOW, bound=96, scale=0.125, softcap=0.0)
    cases.append(("wide batch", (wide, *wide_cache, 0, 1, positions[:, None], kv_length), arguments))
    # A prompt chunk: 7 queries of 2 sequences, the second row offset into the cache.
    chunk = rng.standard_normal((2, 7, 9, 64)).astype(np.float32)
    positions = np.asarray([np.arange(30, 37), np.arange(0, 7)])
    arguments = dict(window=NO_WINDOW, bound=96, scale=0.125, softcap=0.0)
    cases.append(("prompt chunk", (chunk, keys, values, 0, 1, positions, np.asarray([37, 7])), arguments))
    return cases


def test_attention_matches_the_reference(arm: ArmKernels, tmp_path: Path) -> None:
    cases = _attention_cases()
    answers = arm.run([_attention_record(*args, **options) for _, args, options in cases], tmp_path)
    for (label, args, options), (status, payload) in zip(cases, answers, strict=True):
        q, values = args[0], args[2]
        got = np.frombuffer(payload, np.float32).reshape(*q.shape[:3], values.shape[4])
        want = _attention_reference(*args, **options)
        error = float(np.max(np.abs(got - want)))
        assert status == 0 and error <= 1e-5 * float(np.max(np.abs(values))), (arm.arch, label, error)


def test_attention_gives_zeros_to_a_row_that_sees_nothing(arm: ArmKernels, tmp_path: Path) -> None:
    """kv_length 0 (nothing written yet) and a padding row past the cache."""
    rng = np.random.default_rng(12)
    keys = rng.standard_normal((1, 3, 96, 2, 64)).astype(np.float16)
    values = rng.standard_normal((1, 3, 96, 2, 64)).astype(np.float16)
    q = rng.standard_normal((3, 1, 6, 64)).astype(np.float32)
    args = (q, keys, values, 0, 0, np.asarray([[7], [96], [3]]), np.asarray([0, 97, 4]))
    options = dict(window=NO_WINDOW, bound=96, scale=0.125, softcap=0.0)
    ((status, payload),) = arm.run([_attention_record(*args, **options)], tmp_path)
    got = np.frombuffer(payload, np.float32).reshape(3, 1, 6, 64)
    assert status == 0
    assert not got[0].any() and not got[1].any()
    want = _attention_reference(*args, **options)
    assert np.max(np.abs(got[2] - want[2])) <= 1e-5 * float(np.max(np.abs(values)))


def _write_record(
    q, k, v, cos, sin, keys, values, layer, first_row, positions, kv_length, *, neox, **options
):
    """A step written into the cache, then attention (record kind 3)."""
    record = _attention_record(q, keys, values, layer, first_row, positions, kv_length, **options)
    return (
        struct.pack("<q", 3)
        + record[8:]
        + struct.pack("<2q", 2 * cos.shape[-1], int(neox))
        + b"".join(np.ascontiguousarray(a, np.float32).tobytes() for a in (k, v, cos, sin))
    )


def test_writing_the_cache_leaves_the_bits_xla_does(arm: ArmKernels, tmp_path: Path) -> None:
    """The step's rotated keys and its values written by the kernel (ARM's fused
    multiply-adds and half conversions) are the bits the x86 XLA path writes, every
    slot; the attention of the rotated queries matches the reference; a position past
    the cache writes nothing."""
    cases = []
    for dtype, neox, dims, dim, group, kv_heads, steps in [
        (np.float16, False, 64, 64, 3, 3, 1),  # SmolLM2's decode step
        (np.float16, True, 256, 256, 4, 1, 1),  # Gemma 3's
        (np.float32, False, 64, 64, 3, 3, 40),  # a prompt chunk, written on the pool
        (np.float16, True, 32, 64, 2, 2, 7),  # rotating part of each head
    ]:
        rng = np.random.default_rng(dims + steps)
        shape = (2, 4, 96, kv_heads, dim)
        keys, values = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
        q = rng.standard_normal((3, steps, kv_heads * group, dim)).astype(np.float32)
        k = (rng.standard_normal((3, steps, kv_heads, dim)) * 3).astype(np.float32)
        v = rng.standard_normal((3, steps, kv_heads, dim)).astype(np.float32)
        angles = rng.uniform(-40, 40, (3, steps, dims // 2)).astype(np.float32)
        start = np.asarray([0, 30, 96 - steps // 2 - 1])  # the last runs past the cache
        positions = start[:, None] + np.arange(steps)
        kv_length = np.minimum(start + steps, 96)
        args = (q, k, v, np.cos(angles), np.sin(angles), keys, values, 1, 1, positions, kv_length)
        cases.append((f"{np.dtype(dtype).name} dims={dims} d={dim} T={steps}", args, neox))
    options = dict(window=NO_WINDOW, bound=96, scale=0.125, softcap=0.0)
    answers = arm.run([_write_record(*args, neox=neox, **options) for _, args, neox in cases], tmp_path)
    for (label, args, neox), (status, payload) in zip(cases, answers, strict=True):
        q, k, v, cos, sin, keys, values, layer, first_row, positions, kv_length = args
        out_bytes = 4 * q.shape[0] * q.shape[1] * q.shape[2] * values.shape[4]
        got = np.frombuffer(payload[:out_bytes], np.float32).reshape(*q.shape[:3], values.shape[4])
        got_keys = np.frombuffer(payload[out_bytes : out_bytes + keys.nbytes], keys.dtype).reshape(keys.shape)
        got_values = np.frombuffer(payload[out_bytes + keys.nbytes :], values.dtype).reshape(values.shape)
        rotated, want_keys, want_values = written_by_xla(
            q, k, v, cos, sin, keys, values, layer, first_row, positions, neox=neox
        )
        assert status == 0, (arm.arch, label)
        np.testing.assert_array_equal(got_keys, want_keys, err_msg=f"{arm.arch} {label}")
        np.testing.assert_array_equal(got_values, want_values, err_msg=f"{arm.arch} {label}")
        want = _attention_reference(
            rotated, want_keys, want_values, layer, first_row, positions, kv_length, **options
        )
        live = positions < 96  # steps past the cache get unspecified values
        error = float(np.max(np.abs(got[live] - want[live])))
        assert error <= 1e-5 * float(np.max(np.abs(values))), (arm.arch, label, error)
