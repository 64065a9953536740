"""Compile the CPU kernels (qmatmul.cc, attention.cc, norm.cc, glu.cc, argmax.cc) into one shared library.

Owns the compiler command and the build cache: the library lands in
`kernels/cpu/_build/` under a name keyed by a hash of the sources, the flags, the
jaxlib version (its FFI headers) and the CPU (the code is built with
`-march=native` for the machine that runs it, or for the `-march` named by the
SWARM_CPU_ARCH environment variable: `x86-64-v3` builds what an AVX2 machine runs).  Each build writes a private
temporary file and renames it into place, so concurrent processes never load a
half-written library.  A missing compiler or a failed build is reported and
yields None; nothing here raises for those.

`python -m kernels.cpu.build` builds (if needed) and prints the library's path.

Imports only jax and the standard library: never gguf, never swarm.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jaxlib

SOURCE_DIR = Path(__file__).resolve().parent
BUILD_DIR = SOURCE_DIR / "_build"
SOURCES = (
    "qmatmul.cc",
    "attention.cc",
    "norm.cc",
    "glu.cc",
    "argmax.cc",
    "gemm.h",
    "gemm_avx2.h",
    "half.h",
    "panel.h",
    "portable.h",
    "thread_pool.h",
)
UNITS = (
    "qmatmul.cc",
    "attention.cc",
    "norm.cc",
    "glu.cc",
    "argmax.cc",
)  # compiled; the headers come in through them
FLAGS = ("-O3", "-std=c++20", "-fPIC", "-shared", "-fno-math-errno")
ARCH_VARIABLE = "SWARM_CPU_ARCH"  # the -march to build for, instead of "native"
COMPILERS = ("c++", "g++", "clang++")
# Compiling takes a few seconds; a stuck compiler must not hang the caller forever.
COMPILE_TIMEOUT_S = 300
# Libraries of other sources or targets are removed once this old: a process built for
# another -march (SWARM_CPU_ARCH) may still be loading its own.
STALE_AFTER_S = 24 * 3600

logger = logging.getLogger(__name__)


class BuildError(RuntimeError):
    """Why the kernel library could not be built (no compiler, compile error)."""


def _cpu_identity() -> str:
    """The CPU model and feature flags: a library built for one CPU must not load on another."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    picked = sorted({line.strip() for line in lines if line.split(":")[0].strip() in wanted})
    return "\n".join(picked)


def target_arch() -> str:
    """The `-march` the library is built for: SWARM_CPU_ARCH, or "native"."""
    arch = os.environ.get(ARCH_VARIABLE, "").strip() or "native"
    if not all(c.isalnum() or c in "-_.+" for c in arch):
        raise BuildError(f"{ARCH_VARIABLE}={arch!r} is not a -march value")
    return arch


def _flags(arch: str | None = None) -> tuple[str, ...]:
    return (*FLAGS, f"-march={arch or target_arch()}")


def compile_command(compiler: str, output: str, arch: str | None = None) -> list[str]:
    """The command that builds the library into `output` with `compiler` for `-march=arch`
    (default: `target_arch()`); a cross compiler builds it for another CPU family."""
    return [
        compiler,
        *_flags(arch),
        "-isystem",
        jax.ffi.include_dir(),
        *(str(SOURCE_DIR / unit) for unit in UNITS),
        "-o",
        output,
    ]


def find_compiler() -> str | None:
    """Path of the first C++ compiler on PATH, or None."""
    for name in COMPILERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def library_path(compiler: str) -> Path:
    """Where the library built from the current sources by `compiler` lives."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes() + b"\0")
    for part in (*_flags(), compiler, jaxlib.__version__, _cpu_identity()):
        digest.update(part.encode() + b"\0")
    return BUILD_DIR / f"qmatmul-{digest.hexdigest()[:16]}.so"


def _compile(compiler: str, target: Path) -> None:
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp", dir=BUILD_DIR)
    os.close(handle)
    command = compile_command(compiler, temporary)
    try:
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise BuildError(f"could not run {compiler}: {error}") from error
        if result.returncode != 0:
            raise BuildError(f"{' '.join(command)} failed:\n{result.stderr.strip()[-4000:]}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    for stale in BUILD_DIR.glob("qmatmul-*.so"):
        if stale != target and stale.stat().st_mtime < time.time() - STALE_AFTER_S:
            stale.unlink(missing_ok=True)


def build_or_raise() -> Path:
    """The library for the current sources, compiled if missing; BuildError says why not."""
    compiler = find_compiler()
    if compiler is None:
        raise BuildError(f"no C++ compiler found (tried {', '.join(COMPILERS)}); install g++ to build it")
    target = library_path(compiler)
    if not target.exists():
        logger.info("compiling the CPU kernels into %s", target)
        _compile(compiler, target)
    return target


def build() -> Path | None:
    """Like `build_or_raise`, but logs the reason and returns None when it cannot build."""
    try:
        return build_or_raise()
    except (BuildError, OSError) as error:
        logger.warning("CPU kernels unavailable: %s", error)
        return None


def main() -> int:
    try:
        path = build_or_raise()
    except (BuildError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
