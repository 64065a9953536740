"""Loading the weights of one layer range from a GGUF into a `RangeWeights` pytree.

Owns the mapping from GGUF tensor names to the model's parameter names, the choice
between packed (`QuantTensor`, for GPUs) and f32 weights (fastest under XLA on CPU),
and the grouping of consecutive layers with identical weight layouts so that each
group runs under one `lax.scan`. Only the tensors of the requested range are read
from the memory map.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from kernels import QuantTensor, ops, stack
from kernels.attention import NO_WINDOW
from kernels.quant_types import GGMLType
from swarm.errors import ModelFileError
from swarm.gguf_file import GGUFFile, TensorInfo
from swarm.model import LayerGroup, RangeWeights
from swarm.model_config import ModelConfig

# Parameter name -> GGUF tensor name within block N (llama.cpp's LLM_TENSOR_NAMES).
LAYER_TENSORS = {
    "attn_norm": "attn_norm.weight",
    "wq": "attn_q.weight",
    "wk": "attn_k.weight",
    "wv": "attn_v.weight",
    "wo": "attn_output.weight",
    "bq": "attn_q.bias",
    "bk": "attn_k.bias",
    "bv": "attn_v.bias",
    "q_norm": "attn_q_norm.weight",
    "k_norm": "attn_k_norm.weight",
    "post_attn_norm": "post_attention_norm.weight",
    "ffn_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight",
    "w_up": "ffn_up.weight",
    "w_down": "ffn_down.weight",
    "post_ffn_norm": "post_ffw_norm.weight",
}
MATRICES = frozenset({"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"})


def layer_param_names(config: ModelConfig) -> list[str]:
    names = ["attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down"]
    if config.qkv_bias:
        names += ["bq", "bk", "bv"]
    if config.qk_norm:
        names += ["q_norm", "k_norm"]
    if config.post_norms:
        names += ["post_attn_norm", "post_ffn_norm"]
    return names


def _dequantize(gguf: GGUFFile, info: TensorInfo) -> jax.Array:
    """The tensor as an f32 device array in numpy row-major shape (reversed ne)."""
    raw = gguf.tensor_bytes(info.name)
    if info.qtype == GGMLType.F32:
        values = jnp.array(np.asarray(raw).view(np.float32).reshape(info.shape))
    else:
        packed = QuantTensor.from_packed(np.asarray(raw), info.qtype, (info.rows, info.ne[0]))
        values = packed.dequantize().reshape(info.shape)
    gguf.release(info.name)  # the values are a copy: the file's pages are not needed
    return values


@dataclass(frozen=True)
class _Layout:
    """How matrices are held: packed QuantTensor (GPU, CPU kernels) or f32 arrays (plain
    CPU), packed ones in the byte layout the `kernels` path reads fastest."""

    packed: bool
    kernels: str = "auto"

    def is_packed(self, info: TensorInfo) -> bool:
        return self.packed and info.qtype != GGMLType.F32

    def signature(self, info: TensorInfo) -> tuple:
        return (info.ne, info.qtype if self.is_packed(info) else None)

    def matrix(self, gguf: GGUFFile, info: TensorInfo) -> jax.Array | QuantTensor:
        if self.is_packed(info):
            tensor = QuantTensor.from_packed(
                np.asarray(gguf.tensor_bytes(info.name)), info.qtype, (info.rows, info.ne[0])
            )
            arranged = ops.arrange(tensor, impl=self.kernels)
            # A permuted copy no longer reads the file's pages; bytes held in place (the
            # rows layout) are read from the file again when first used.
            gguf.release(info.name)
            return arranged
        return _dequantize(gguf, info)

    def stacked(self, gguf: GGUFFile, infos: list[TensorInfo]) -> jax.Array | QuantTensor:
        if self.is_packed(infos[0]):
            return stack([self.matrix(gguf, info) for info in infos])
        values = np.empty((len(infos), *infos[0].shape), np.float32)
        for slot, info in enumerate(infos):
            values[slot] = _dequantize(gguf, info)
        return jnp.asarray(values)


def _layer_signature(gguf: GGUFFile, names: Iterable[str], layer: int, layout: _Layout) -> tuple:
    return tuple(
        (name, layout.signature(gguf.tensor_info(f"blk.{layer}.{LAYER_TENSORS[name]}"))) for name in names
    )


def _stack_group(
    gguf: GGUFFile, config: ModelConfig, names: list[str], layers: range, first: int, layout: _Layout
) -> LayerGroup:
    params = {}
    for name in names:
        infos = [gguf.tensor_info(f"blk.{i}.{LAYER_TENSORS[name]}") for i in layers]
        if name in MATRICES:
            params[name] = layout.stacked(gguf, infos)
        else:
            params[name] = jnp.asarray(np.stack([_dequantize(gguf, info) for info in infos]))
    sliding = [config.layer_is_sliding(i) for i in layers]
    return LayerGroup(
        params=params,
        window=jnp.asarray([config.sliding_window if s else NO_WINDOW for s in sliding], jnp.int32),
        rope_table=jnp.asarray([int(s) for s in sliding], jnp.int32),
        offset=layers.start - first,
        count=len(layers),
    )


class _Counted:
    """A GGUF file that reports the tensor bytes read through it (for load progress)."""

    def __init__(self, gguf: GGUFFile, total: int, progress: Callable[[int, int], None]) -> None:
        self.gguf, self.total, self.progress, self.done = gguf, total, progress, 0

    def tensor_info(self, name: str) -> TensorInfo:
        return self.gguf.tensor_info(name)

    def tensor_bytes(self, name: str):
        data = self.gguf.tensor_bytes(name)
        self.done += self.gguf.tensor_info(name).nbytes
        self.progress(min(self.done, self.total), self.total)
        return data

    def release(self, name: str) -> None:
        self.gguf.release(name)

    def release_all(self) -> None:
        self.gguf.release_all()


def _bytes_to_read(gguf: GGUFFile, config: ModelConfig, names: list[str], first: int, last: int) -> int:
    """The tensor bytes `load_range_weights` reads for layers [first, last)."""
    tensors = [f"blk.{i}.{LAYER_TENSORS[name]}" for i in range(first, last) for name in names]
    is_last = last == config.n_layers
    if first == 0 or (is_last and config.tied_output):
        tensors.append("token_embd.weight")
    if is_last:
        tensors.append("output_norm.weight")
        if not config.tied_output:
            tensors.append("output.weight")
    return sum(gguf.tensor_info(name).nbytes for name in tensors)


def load_range_weights(
    gguf: GGUFFile,
    config: ModelConfig,
    first: int,
    last: int,
    *,
    packed: bool,
    unrolled: bool = False,
    kernels: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> RangeWeights:
    """Weights for layers [first, last).

    packed keeps quantized matrices as QuantTensor (else f32 arrays), laid out for
    the `kernels` path (`kernels.ops.arrange`); unrolled gives every layer a group
    of its own, which the model runs without a scan. `progress(done, total)` hears the
    tensor bytes read so far after each tensor.
    """
    layout = _Layout(packed, kernels)
    if not 0 <= first < last <= config.n_layers:
        raise ModelFileError(f"layer range {first}-{last} is outside 0-{config.n_layers}")
    names = layer_param_names(config)
    if progress is not None:
        gguf = _Counted(gguf, _bytes_to_read(gguf, config, names, first, last), progress)
    groups: list[LayerGroup] = []
    start = first
    signature = _layer_signature(gguf, names, first, layout)
    for layer in range(first + 1, last + 1):
        next_signature = _layer_signature(gguf, names, layer, layout) if layer < last else None
        if next_signature != signature or unrolled:
            groups.append(_stack_group(gguf, config, names, range(start, layer), first, layout))
            start, signature = layer, next_signature

    embedding = output_norm = output = None
    is_last = last == config.n_layers
    if first == 0 or (is_last and config.tied_output):
        embedding = layout.matrix(gguf, gguf.tensor_info("token_embd.weight"))
    if is_last:
        output_norm = jnp.asarray(_dequantize(gguf, gguf.tensor_info("output_norm.weight")))
        output = embedding if config.tied_output else layout.matrix(gguf, gguf.tensor_info("output.weight"))
    # Every tensor is copied now: what the reads mapped around them goes too.
    gguf.release_all()
    # Table 0 serves global layers, table 1 sliding ones (LayerGroup.rope_table).
    bases = np.asarray([config.rope_base, config.rope_base_sliding], np.float32)
    return RangeWeights(
        groups=groups,
        embedding=embedding if first == 0 else None,
        output_norm=output_norm,
        output=output,
        # powf(base, -2/n_dims) in f32, as ggml_compute_forward_rope does.
        rope_theta_scale=jnp.asarray(np.power(bases, np.float32(-2.0 / config.rope_dims)), jnp.float32),
        rope_freq_scale=jnp.asarray([config.rope_scale, 1.0], jnp.float32),
    )
