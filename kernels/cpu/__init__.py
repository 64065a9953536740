"""CPU quantized matmul on packed GGUF rows, as an XLA custom call through `jax.ffi`.

Owns the Python side of the C++ kernel in qmatmul.cc: building and loading the
library once per process (lazily, on the first `available()`), registering its
FFI target for the CPU platform, and `qmatmul`, which multiplies activations by a
`QuantTensor` without dequantizing it.  The kernel quantizes activations to 8-bit
blocks of 32 as llama.cpp's CPU backend does, so results differ from
`dequant_matmul_reference` by that rounding (about 1e-3 of |x| @ |w|.T).

`kernels.ops.matmul` routes to it (impl "cpu", or "auto" on the CPU backend) for
the types in `SUPPORTED`; everything else stays on the reference path.

Imports only jax, numpy and the standard library: never gguf, never swarm.
"""

from __future__ import annotations

import ctypes
import threading

import jax
import jax.numpy as jnp
import numpy as np

from kernels.cpu import build
from kernels.qtensor import QuantTensor
from kernels.quant_types import GGMLType, quant_format

FFI_TARGET = "swarm_qmatmul_cpu"

SUPPORTED = frozenset(
    int(t)
    for t in (
        GGMLType.Q4_0,
        GGMLType.Q4_1,
        GGMLType.Q5_0,
        GGMLType.Q5_1,
        GGMLType.Q8_0,
        GGMLType.Q4_K,
        GGMLType.Q5_K,
        GGMLType.Q6_K,
    )
)

_lock = threading.Lock()
_state: dict[str, object] = {}  # "library" (ctypes.CDLL) once loaded, or "reason" it is not


def _load() -> str | None:
    """Builds, loads and registers the kernel once; None on success, else why not."""
    with _lock:
        if "reason" not in _state:
            _state["reason"] = _load_locked()
        return _state["reason"]  # type: ignore[return-value]


def _load_locked() -> str | None:
    try:
        path = build.build_or_raise()
    except (build.BuildError, OSError) as error:
        return f"CPU qmatmul kernel could not be built: {error}"
    try:
        library = ctypes.CDLL(str(path))
    except OSError as error:
        return f"CPU qmatmul kernel {path} could not be loaded: {error}"
    if not library.swarm_qmatmul_simd():
        return "CPU qmatmul kernel needs AVX-512 BW/VL/VNNI, which this CPU lacks"
    jax.ffi.register_ffi_target(FFI_TARGET, jax.ffi.pycapsule(library.SwarmQMatmul), platform="cpu")
    _state["library"] = library
    return None


def available() -> bool:
    """True if the kernel is built (building it now if needed), loaded and registered."""
    return _load() is None


def unavailable_reason() -> str | None:
    """Why `available()` is False (None when it is True)."""
    return _load()


def supports(qtype: int) -> bool:
    """True if the kernel handles GGML type `qtype` (others stay on the reference path)."""
    return int(qtype) in SUPPORTED


def threads() -> int:
    """Threads the kernel's pool runs on (0 when the kernel is unavailable)."""
    if not available():
        return 0
    return int(_state["library"].swarm_qmatmul_threads())  # type: ignore[attr-defined]


def qmatmul(x: jax.Array, w: QuantTensor) -> jax.Array:
    """x f32[m, k] times the packed weight w (shape (n, k), data u8[n, row_bytes]) -> f32[m, n].

    Usable under `jit` and inside `lax.scan` bodies; the caller flattens leading
    axes of x.  Raises if the type is unsupported or the kernel is unavailable:
    `kernels.ops.matmul` checks both and falls back instead.
    """
    if not isinstance(w, QuantTensor) or w.data.ndim != 2:
        raise ValueError("w must be a QuantTensor with data u8[out, row_bytes] (index stacked layers first)")
    if not supports(w.qtype):
        raise ValueError(f"the CPU kernel does not support {quant_format(w.qtype).name} weights")
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2 or x.shape[1] != w.in_features:
        raise ValueError(
            f"x must be f32[m, {w.in_features}] for a weight of shape {w.shape}; got {list(x.shape)}"
        )
    reason = _load()
    if reason is not None:
        raise RuntimeError(reason)
    call = jax.ffi.ffi_call(
        FFI_TARGET,
        jax.ShapeDtypeStruct((x.shape[0], w.out_features), jnp.float32),
        vmap_method="sequential",
    )
    return call(x, w.data, qtype=np.int32(w.qtype))
