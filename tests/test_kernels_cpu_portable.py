"""kernels.cpu as CPUs without AVX-512 VNNI build it: the portable matmul.

Most CPUs in a swarm lack AVX-512 VNNI (AVX2 laptops and desktops, ARM machines).
There the library holds the portable matmul (kernels/cpu/portable.h), which reads the
GGUF's rows so that weights stay packed, and a portable cache attention; RMS norms
and SwiGLU run in jnp.

On an x86-64 machine the library builds for such CPUs with SWARM_CPU_ARCH (the
compiler then emits no instruction the target lacks):

* x86-64-v3, an AVX2 machine: the portable kernel's AVX2 code;
* alderlake, AVX2 with AVX-VNNI (where this CPU has it): its 256-bit VNNI dot products;
* x86-64, the SSE2 baseline: the plain C++ that every other CPU (ARM included)
  compiles, vectorized by the compiler alone.

Each build runs, in a process of its own, the kernel tests (products against the jnp
reference and against the integer scheme the AVX-512 kernel computes; attention
against its jnp reference), and the AVX2 build also the real models against
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


@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64"])
def test_the_portable_build_loads_and_names_itself(arch: str) -> None:
    script = "from kernels import cpu; print(cpu.isa(), cpu.fused_available(), cpu.threads() > 0)"
    result = _run(arch, "-c", script, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == ["portable", "False", "True"]


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
def test_the_portable_build_passes_the_kernel_tests(arch: str) -> None:
    # The AVX2 build runs the attention and routing tests too; the other two differ from
    # it in the matmul's dot products only.
    targets = ["tests/test_kernels_cpu.py"]
    if arch == "x86-64-v3":
        targets += ["tests/test_kernels_ops.py", "tests/test_kernels_cpu_attention.py"]
    counts = _pytest(arch, *targets)
    # Every product (and attention) test runs, the panels cases alone skip: the counts
    # guard against a build that skipped everything.
    assert counts.get("passed", 0) >= (120 if arch == "x86-64-v3" else 75), counts
    assert counts.get("skipped", 0) <= 40, counts


@pytest.mark.realmodel
def test_the_avx2_build_matches_llama_cpp_on_the_real_models() -> None:
    """The engine on an AVX2 machine (packed weights on the portable matmul and
    attention, norms in jnp): greedy tokens and logprobs against llama.cpp as on
    AVX-512, and a batched row's logits bit for bit those of the row alone."""
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
