"""kernels.cpu as CPUs without AVX-512 VNNI build it.

Most CPUs in a swarm lack AVX-512 VNNI (AVX2 laptops and desktops, ARM machines).
On AVX2 CPUs the library's matmul reads the panels layout on 256-bit registers
(kernels/cpu/gemm_avx2.h) and gives the AVX-512 build's bits; elsewhere it holds the
portable matmul (kernels/cpu/portable.h), which reads the GGUF's rows so that weights
stay packed.  Both hold a portable cache attention; RMS norms and SwiGLU run in jnp.

On an x86-64 machine the library builds for such CPUs with SWARM_CPU_ARCH (the
compiler then emits no instruction the target lacks):

* x86-64-v3, an AVX2 machine: `vpmaddubsw` products;
* alderlake, AVX2 with AVX-VNNI (where this CPU has it): 256-bit `vpdpbusd`;
* x86-64, the SSE2 baseline: the plain C++ that every other CPU (ARM included)
  compiles, vectorized by the compiler alone.

Each build runs, in a process of its own, the kernel tests (products against the jnp
reference and against the integer scheme the AVX-512 kernel computes; attention
against its jnp reference); the AVX2 builds' products are compared bit for bit with
this process's AVX-512 ones, and the AVX2 build also runs the real models against
llama.cpp's greedy tokens and logprobs.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kernels import cpu
from kernels.cpu import build

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="builds for x86-64 targets"),
    pytest.mark.skipif(build.find_compiler() is None, reason="no C++ compiler"),
    pytest.mark.skipif(
        not cpu.fused_available(),
        reason="this CPU runs the portable build already, so the other tests cover it",
    ),
]


def _run(arch: str, *args: str, timeout: int) -> subprocess.CompletedProcess:
    environment = {**os.environ, build.ARCH_VARIABLE: arch}
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _pytest(arch: str, *targets: str, timeout: int = 900) -> dict[str, int]:
    """Runs pytest on `targets` in a process whose kernels are built for `arch`; the
    counts of passed and skipped tests (failing the test with pytest's output if any failed)."""
    result = _run(arch, "-m", "pytest", "-q", "-p", "no:cacheprovider", *targets, timeout=timeout)
    tail = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, f"pytest under {build.ARCH_VARIABLE}={arch} failed:\n{tail}"
    counts = {word: int(number) for number, word in re.findall(r"(\d+) (passed|skipped|failed)", tail)}
    return counts


@pytest.mark.parametrize(
    ("arch", "isa", "panels"), [("x86-64-v3", "avx2", "True"), ("x86-64", "portable", "False")]
)
def test_the_build_for_another_cpu_loads_and_names_itself(arch: str, isa: str, panels: str) -> None:
    script = (
        "from kernels import cpu; "
        "print(cpu.isa(), cpu.fused_available(), cpu.panels_available(), cpu.threads() > 0)"
    )
    result = _run(arch, "-c", script, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == [isa, "False", panels, "True"]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    return {
        flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":")[1].split()
    }


# alderlake: AVX2 with AVX-VNNI (256-bit vpdpbusd) and no AVX-512, as Intel's client CPUs since 2021.
_AVX_VNNI = pytest.param(
    "alderlake",
    marks=pytest.mark.skipif("avx_vnni" not in _cpu_flags(), reason="this CPU lacks AVX-VNNI"),
)


@pytest.mark.parametrize("arch", ["x86-64-v3", _AVX_VNNI, "x86-64"])
def test_the_build_for_another_cpu_passes_the_kernel_tests(arch: str) -> None:
    # The AVX2 build runs the panels, attention and routing tests too; the other two
    # differ from it in the matmul's dot products only.
    targets = ["tests/test_kernels_cpu.py"]
    if arch == "x86-64-v3":
        targets += [
            "tests/test_kernels_panels.py",
            "tests/test_kernels_ops.py",
            "tests/test_kernels_cpu_attention.py",
        ]
    counts = _pytest(arch, *targets)
    # Every product (and attention) test runs, the portable build skipping the panels
    # cases alone: the counts guard against a build that skipped everything.
    assert counts.get("passed", 0) >= (200 if arch == "x86-64-v3" else 75), counts
    assert counts.get("skipped", 0) <= (10 if arch == "x86-64-v3" else 40), counts


# Products every build computes for the bit-for-bit comparison: each format, both
# layouts, row counts on the register path (1, 3, 8) and the buffered one (9, 40), and
# weights of whole panels (48 rows) and not (40: the rows layout's partial panel).
_COMPARED_ROWS = (1, 3, 8, 9, 40)


def write_products(path: str) -> None:
    """Saves this process's kernel products of the cases above to `path` (.npz)."""
    from kernels.qtensor import QuantTensor
    from kernels.quant_types import FORMATS
    from tests.quant_blocks import random_blocks

    products = {}
    for qtype in sorted(cpu.SUPPORTED):
        block = FORMATS[qtype].block_size
        k = 512 if block == 32 else 768
        for n in (48, 40):
            blocks = random_blocks(qtype, rows=n, blocks=k // block, seed=qtype + n, scale=0.05)
            w = QuantTensor.from_packed(blocks, qtype, (n, k))
            for m in _COMPARED_ROWS:
                x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
                x[0, :32] = 0.0  # an all-zero activation block
                products[f"{FORMATS[qtype].name} n={n} m={m} rows"] = np.asarray(cpu.qmatmul(x, w))
                if w.can_use_panels():
                    products[f"{FORMATS[qtype].name} n={n} m={m} panels"] = np.asarray(
                        cpu.qmatmul(x, w.to_panels())
                    )
    np.savez(path, **products)


@pytest.mark.parametrize("arch", ["x86-64-v3", _AVX_VNNI])
def test_the_avx2_builds_give_the_avx512_builds_bits(arch: str, tmp_path: Path) -> None:
    """A node on an AVX2 CPU computes every product bit for bit as one on AVX-512: the
    same integer sums and float steps, so a pipeline or a prefix block does not depend
    on which of them ran it."""
    theirs_path, ours_path = tmp_path / "theirs.npz", tmp_path / "ours.npz"
    script = (
        f"from tests.test_kernels_cpu_portable import write_products; write_products({str(theirs_path)!r})"
    )
    result = _run(arch, "-c", script, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    write_products(str(ours_path))
    theirs, ours = np.load(theirs_path), np.load(ours_path)
    assert sorted(theirs.files) == sorted(ours.files) and len(ours.files) == 8 * 3 * len(_COMPARED_ROWS)
    differing = [key for key in ours.files if not np.array_equal(theirs[key], ours[key])]
    assert not differing, differing


@pytest.mark.realmodel
def test_the_avx2_build_matches_llama_cpp_on_the_real_models() -> None:
    """The engine on an AVX2 machine (weights in panels on the AVX2 matmul, the
    portable attention, norms in jnp): greedy tokens and logprobs against llama.cpp as
    on AVX-512, and a batched row's logits bit for bit those of the row alone."""
    counts = _pytest(
        "x86-64-v3",
        "tests/test_fidelity.py::test_greedy_tokens_and_logprobs_match_llama_cpp",
        "tests/test_batching.py::test_a_rows_logits_do_not_depend_on_what_shares_its_step",
        timeout=1500,
    )
    assert counts.get("passed", 0) == 3, counts


ARM_COMPILER = "aarch64-linux-gnu-g++"


@pytest.mark.skipif(
    shutil.which(ARM_COMPILER) is None, reason=f"no {ARM_COMPILER} (Debian's g++-aarch64-linux-gnu)"
)
@pytest.mark.parametrize("arch", ["armv8-a", "armv8.2-a+dotprod+fp16"])
def test_the_library_builds_for_arm(arch: str, tmp_path: Path) -> None:
    """ARM machines (Apple silicon under Linux, Graviton, Raspberry Pi 5) run the
    portable kernels: the library builds for them with the build's own command, and with
    the dot-product extension the 8-bit dot products become `sdot`. tests/test_kernels_arm.py
    runs the kernels themselves on an emulated ARM CPU."""
    output = tmp_path / "kernels-arm.so"
    result = subprocess.run(
        build.compile_command(ARM_COMPILER, str(output), arch),
        capture_output=True,
        text=True,
        timeout=build.COMPILE_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert output.read_bytes()[:4] == b"\x7fELF"
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump is not None and "dotprod" in arch:
        listing = subprocess.run([objdump, "-d", str(output)], capture_output=True, text=True, check=True)
        assert "sdot" in listing.stdout
