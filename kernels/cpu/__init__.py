"""CPU quantized matmul on packed GGUF rows, as an XLA custom call through `jax.ffi`.

Owns the Python side of the C++ kernel in qmatmul.cc: building and loading the
library once per process (lazily, on the first `available()`), registering its
FFI target for the CPU platform, and `qmatmul`, which multiplies activations by a
`QuantTensor` without dequantizing it.  The kernel quantizes activations to 8-bit
blocks of 32 as llama.cpp's CPU backend does, so results differ from
`dequant_matmul_reference` by that rounding (about 1e-3 of |x| @ |w|.T).

`kernels.ops.matmul` routes to it (impl "cpu", or "auto" on the CPU backend) for
the types in `SUPPORTED`; everything else stays on the reference path.  On a CPU
with AVX-512 VNNI (`isa()` "avx512-vnni") the same library holds `cache_attention`
and `cache_write_attention` (attention.cc), `rms_norm` (norm.cc), `swiglu`
(glu.cc) and `argmax` (argmax.cc: a decode step's greedy tokens), which `kernels.ops`
routes to on the same terms, and the matmul reads the panels layout.  On an AVX2 CPU (`isa()` "avx2") the matmul reads the same panels
layout on 256-bit registers, with the AVX-512 build's bits (gemm_avx2.h); on any other
CPU (`isa()` "portable": ARM, older x86, ...) the library holds the portable matmul
(portable.h), which reads the GGUF's rows.  Both hold portable versions of the
attention calls, while RMS norms and SwiGLU run in jnp (`fused_available()` is False).

Imports only jax, numpy and the standard library: never gguf, never swarm.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kernels.qtensor import PANELS, QuantTensor
from kernels.quant_types import GGMLType, quant_format

FFI_TARGET = "swarm_qmatmul_cpu"
MAX_MATRICES = 8  # weights one qmatmul call takes at most (kMaxMatrices in qmatmul.cc)
ATTENTION_TARGET = "swarm_cache_attention_cpu"
WRITE_ATTENTION_TARGET = "swarm_cache_write_attention_cpu"
NORM_TARGET = "swarm_rms_norm_cpu"
SWIGLU_TARGET = "swarm_swiglu_cpu"
ARGMAX_TARGET = "swarm_argmax_cpu"

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
    # Imported here, not with the package: `python -m kernels.cpu.build` then runs the
    # module once, without Python's warning about a module imported before it runs.
    from kernels.cpu import build

    try:
        path = build.build_or_raise()
    except (build.BuildError, OSError) as error:
        return f"CPU qmatmul kernel could not be built: {error}"
    try:
        library = ctypes.CDLL(str(path))
    except OSError as error:
        return f"CPU qmatmul kernel {path} could not be loaded: {error}"
    jax.ffi.register_ffi_target(FFI_TARGET, jax.ffi.pycapsule(library.SwarmQMatmul), platform="cpu")
    jax.ffi.register_ffi_target(
        ATTENTION_TARGET, jax.ffi.pycapsule(library.SwarmCacheAttention), platform="cpu"
    )
    jax.ffi.register_ffi_target(
        WRITE_ATTENTION_TARGET, jax.ffi.pycapsule(library.SwarmCacheWriteAttention), platform="cpu"
    )
    simd = bool(library.swarm_qmatmul_simd())
    _state["panels"] = bool(library.swarm_qmatmul_panels())
    if simd:
        jax.ffi.register_ffi_target(NORM_TARGET, jax.ffi.pycapsule(library.SwarmRmsNorm), platform="cpu")
        jax.ffi.register_ffi_target(SWIGLU_TARGET, jax.ffi.pycapsule(library.SwarmSwiGlu), platform="cpu")
        jax.ffi.register_ffi_target(ARGMAX_TARGET, jax.ffi.pycapsule(library.SwarmArgmax), platform="cpu")
    _state["library"] = library
    _state["simd"] = simd
    return None


def available() -> bool:
    """True if the kernel is built (building it now if needed), loaded and registered."""
    return _load() is None


def unavailable_reason() -> str | None:
    """Why `available()` is False (None when it is True)."""
    return _load()


def fused_available() -> bool:
    """True if the library also holds the RMS norm and SwiGLU kernels, and its matmul
    reads the panels layout: the AVX-512 VNNI build."""
    return available() and bool(_state["simd"])


def panels_available() -> bool:
    """True if the library's matmul reads the panels layout (what `kernels.ops.arrange`
    stores weights in): the AVX-512 VNNI and the AVX2 builds."""
    return available() and bool(_state["panels"])


def isa() -> str | None:
    """Which build runs: "avx512-vnni", "avx2", "portable", or None when none is available."""
    if not available():
        return None
    if _state["simd"]:
        return "avx512-vnni"
    return "avx2" if _state["panels"] else "portable"


def _ffi_call(target: str, results, **options):
    """`jax.ffi.ffi_call` of one of the library's targets (with `options`), building and
    registering the library first; raises RuntimeError saying why when it is unavailable."""
    reason = _load()
    if reason is not None:
        raise RuntimeError(reason)
    if target in (NORM_TARGET, SWIGLU_TARGET, ARGMAX_TARGET) and not _state["simd"]:
        raise RuntimeError(
            "the CPU RMS norm, SwiGLU and argmax kernels need AVX-512 VNNI, which this CPU lacks"
        )
    return jax.ffi.ffi_call(target, results, vmap_method="sequential", **options)


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

    Both byte layouts (`QuantTensor.layout`) are read in place.  Usable under `jit`
    and inside `lax.scan` bodies; the caller flattens leading axes of x.  Raises if the
    type is unsupported or the kernel is unavailable: `kernels.ops.matmul` checks both
    and falls back instead.
    """
    return qmatmuls(x, [w])[0]


def can_share_call(ws: Sequence[QuantTensor]) -> bool:
    """Whether `qmatmuls` takes these weights in one call: one supported type and layout,
    one input width, at most MAX_MATRICES of them."""
    return (
        0 < len(ws) <= MAX_MATRICES
        and all(isinstance(w, QuantTensor) and w.data.ndim == 2 and supports(w.qtype) for w in ws)
        and len({(int(w.qtype), w.layout, w.in_features) for w in ws}) == 1
    )


def qmatmuls(
    x: jax.Array, ws: Sequence[QuantTensor], adds: Sequence[jax.Array] | None = None
) -> list[jax.Array]:
    """x f32[m, k] times each packed weight of `ws` -> [f32[m, n_j]], in one custom call;
    with `adds`, product j plus adds[j] f32[m, n_j] (a residual connection, added as
    each product is stored: the same f32 sums as adding afterwards, without a pass).

    The activations are quantized once and one pool run covers every weight's panels,
    so a layer's q, k and v (or its gate and up) cost one call instead of several.
    The weights must share one supported type, layout and input width (`can_share_call`);
    each product equals `qmatmul`'s bit for bit.
    """
    for w in ws:
        if not isinstance(w, QuantTensor) or w.data.ndim != 2:
            raise ValueError(
                "w must be a QuantTensor with data u8[out, row_bytes] (index stacked layers first)"
            )
        if not supports(w.qtype):
            raise ValueError(f"the CPU kernel does not support {quant_format(w.qtype).name} weights")
        if w.layout == PANELS and not w.can_use_panels():
            raise ValueError(f"a panels-layout weight needs a multiple of 16 rows; got {w.out_features}")
        if w.layout == PANELS and available() and not panels_available():
            raise ValueError("the portable CPU kernel reads the GGUF's rows layout; pass w.to_rows()")
    if not can_share_call(ws):
        raise ValueError(
            f"one call takes 1 to {MAX_MATRICES} weights of one type, layout and input width; got "
            + ", ".join(f"{quant_format(w.qtype).name} {w.layout} {list(w.shape)}" for w in ws)
        )
    x = jnp.asarray(x, jnp.float32)
    k = ws[0].in_features
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(
            f"x must be f32[m, {k}] for weights of shapes {[w.shape for w in ws]}; got {list(x.shape)}"
        )
    shapes = [(x.shape[0], w.out_features) for w in ws]
    if adds is not None:
        adds = [jnp.asarray(a, jnp.float32) for a in adds]
        if [tuple(a.shape) for a in adds] != shapes:
            raise ValueError(
                f"adds must be f32 of the products' shapes {shapes}; got {[list(a.shape) for a in adds]}"
            )
    call = _ffi_call(FFI_TARGET, [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes])
    return list(
        call(
            x,
            *(w.data for w in ws),
            *(adds or ()),
            qtype=np.int32(ws[0].qtype),
            layout=np.int32(ws[0].layout == PANELS),
            add=np.int32(adds is not None),
        )
    )


def cache_attention(
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    layer: jax.Array,
    first_row: jax.Array,
    window: jax.Array,
    positions: jax.Array,
    kv_length: jax.Array,
    *,
    scale: float,
    logit_softcap: float | None,
    bound: int,
) -> jax.Array:
    """Attention of T queries per sequence read in place from a whole KV cache
    -> f32[B, T, Hq, Dv]: decode steps (T = 1) and prompt chunks alike.

    q f32[B, T, Hq, D]; keys/values f16 or f32[L, R, C, Hkv, D]; layer, first_row and
    window i32[]; positions i32[B, T], kv_length i32[B]. Sequence b is cache row
    first_row + b of layer `layer`; query (b, t) sees key j iff j < kv_length[b],
    j <= positions[b, t], positions[b, t] - j < window and j < bound. A query seeing no
    key, or at a position past the cache (a padding row whose write was dropped), gets
    zeros. Only the visible keys and values are read, so nothing of the cache is sliced
    or copied, and each query's result depends on its own keys only, whatever chunk it
    came in.
    """
    if q.ndim != 4 or keys.ndim != 5 or values.ndim != 5 or keys.dtype != values.dtype:
        raise ValueError(
            f"need q f32[B, T, Hq, D] and caches [L, R, C, Hkv, D] of one dtype; got q {list(q.shape)}, "
            f"keys {keys.dtype}{list(keys.shape)}, values {values.dtype}{list(values.shape)}"
        )
    if keys.dtype not in (jnp.float16, jnp.float32):
        raise ValueError(f"the caches must be f16 or f32; got {keys.dtype}")
    operands, attributes = _attention_tail(
        q, layer, first_row, window, positions, kv_length, scale, logit_softcap, bound
    )
    call = _ffi_call(ATTENTION_TARGET, _attention_output(q, values))
    return call(jnp.asarray(q, jnp.float32), keys, values, *operands, **attributes)


def _attention_output(q: jax.Array, values: jax.Array) -> jax.ShapeDtypeStruct:
    """The attention calls' output: f32[B, T, Hq, Dv]."""
    return jax.ShapeDtypeStruct((*q.shape[:3], values.shape[4]), jnp.float32)


def _attention_tail(
    q, layer, first_row, window, positions, kv_length, scale, logit_softcap, bound
) -> tuple[tuple[jax.Array, ...], dict[str, np.generic]]:
    """The operands both attention calls take after the caches (layer, first_row and
    window i32[], positions i32[B, T], kv_length i32[B]) and their attributes."""
    batch, steps = q.shape[:2]
    operands = (
        *(jnp.asarray(value, jnp.int32).reshape(()) for value in (layer, first_row, window)),
        jnp.asarray(positions, jnp.int32).reshape(batch, steps),
        jnp.asarray(kv_length, jnp.int32),
    )
    attributes = dict(
        scale=np.float32(scale), softcap=np.float32(logit_softcap or 0.0), bound=np.int64(bound)
    )
    return operands, attributes


def cache_write_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    table: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    layer: jax.Array,
    first_row: jax.Array,
    window: jax.Array,
    positions: jax.Array,
    kv_length: jax.Array,
    *,
    neox: bool,
    scale: float,
    logit_softcap: float | None,
    bound: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A layer's step written into the cache, then `cache_attention` over it: (out
    f32[B, T, Hq, Dv], keys, values), the caches updated in place.

    q f32[B, T, Hq, D], k f32[B, T, Hkv, D] and v f32[B, T, Hkv, Dv] are the step's
    projections before the rotary embedding; cos and sin f32[tables, B, T, dims / 2] the
    angles of every rotary table, of which table `table` (i32[]) rotates the first `dims`
    features of each head in pairs (2i, 2i + 1), or (i, i + dims / 2) with `neox`. Query
    (b, t)'s rotated keys and its values go to position positions[b, t] of cache row
    first_row + b of layer `layer` (as the cache's dtype, rounded to nearest even; nothing
    for a row or position outside the cache), and its rotated query attends as
    `cache_attention` says. One call does what would otherwise
    take XLA a rotation, a conversion and two scatters per layer.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or cos.ndim != 4 or cos.shape != sin.shape:
        raise ValueError(
            f"need q, k, v f32[B, T, H, D] and cos, sin f32[tables, B, T, dims / 2]; got q {list(q.shape)}, "
            f"k {list(k.shape)}, v {list(v.shape)}, cos {list(cos.shape)}, sin {list(sin.shape)}"
        )
    if (
        keys.ndim != 5
        or values.ndim != 5
        or keys.dtype != values.dtype
        or keys.dtype not in (jnp.float16, jnp.float32)
    ):
        raise ValueError(
            f"the caches must be f16 or f32 [L, R, C, Hkv, D] of one dtype; got keys {keys.dtype}{list(keys.shape)}, "
            f"values {values.dtype}{list(values.shape)}"
        )
    operands, attributes = _attention_tail(
        q, layer, first_row, window, positions, kv_length, scale, logit_softcap, bound
    )
    call = _ffi_call(
        WRITE_ATTENTION_TARGET,
        (
            _attention_output(q, values),
            jax.ShapeDtypeStruct(keys.shape, keys.dtype),
            jax.ShapeDtypeStruct(values.shape, values.dtype),
        ),
        input_output_aliases={6: 1, 7: 2},
    )
    out, keys, values = call(
        *(jnp.asarray(a, jnp.float32) for a in (q, k, v, cos, sin)),
        jnp.asarray(table, jnp.int32).reshape(()),
        keys,
        values,
        *operands,
        **attributes,
        neox=np.int32(neox),
    )
    return out, keys, values


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMS norm of each row of x f32[..., d] times weight f32[d], as llama.cpp's CPU
    backend computes it: squares rounded to f32 and summed in f64, the mean rounded to
    f32, then (x * (1 / sqrt(mean + eps))) * weight. Each row depends on itself only."""
    if x.ndim < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(
            f"need x f32[..., d] and weight f32[d]; got x {list(x.shape)}, weight {list(weight.shape)}"
        )
    call = _ffi_call(NORM_TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32))
    return call(jnp.asarray(x, jnp.float32), jnp.asarray(weight, jnp.float32), eps=np.float32(eps))


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up for f32[..., n] arrays of one shape, as llama.cpp's CPU backend
    computes it (ggml_vec_swiglu_f32 with its AVX-512 exp). Each element depends on its
    own inputs only."""
    if gate.shape != up.shape or gate.ndim < 1:
        raise ValueError(
            f"need gate and up f32[..., n] of one shape; got {list(gate.shape)} and {list(up.shape)}"
        )
    call = _ffi_call(SWIGLU_TARGET, jax.ShapeDtypeStruct(gate.shape, jnp.float32))
    return call(jnp.asarray(gate, jnp.float32), jnp.asarray(up, jnp.float32))


def argmax(logits: jax.Array) -> jax.Array:
    """i32[...]: each row of logits f32[..., v]'s greedy token, as numpy's argmax picks it
    (the first index of the largest value, or of the first NaN), read while the logits are
    still in the cores' caches."""
    call = _ffi_call(ARGMAX_TARGET, jax.ShapeDtypeStruct(logits.shape[:-1], jnp.int32))
    return call(jnp.asarray(logits, jnp.float32))
