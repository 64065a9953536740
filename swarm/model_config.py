"""Architecture config read from GGUF metadata.

Owns `ModelConfig`, a frozen dataclass holding every number and switch the model
math needs. Architecture differences live here as fields (rope style, norms, biases,
sliding windows, activation), so the math in `swarm.model` never branches on an
architecture name. Values and conventions mirror llama.cpp (`src/llama-model.cpp`,
`llm_build_llama`, `llm_build_qwen2`, `llm_build_gemma3_iswa`).

Imports nothing heavy (no jax, no numpy).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from swarm.errors import ModelFileError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int  # key/query width per head
    value_dim: int  # value width per head
    ffn_dim: int
    vocab_size: int
    context_length: int
    rms_eps: float
    # Rotary embeddings. "norm" rotates adjacent pairs (x[2i], x[2i+1]); "neox" rotates
    # (x[i], x[i + n/2]) -- llama.cpp's LLAMA_ROPE_TYPE_NORM / _NEOX.
    rope_style: str
    rope_dims: int
    rope_base: float
    rope_scale: float  # positions are multiplied by this (ggml's freq_scale)
    # Sliding-window layers (Gemma 3): layer i slides when sliding_pattern and
    # i % sliding_pattern < sliding_pattern - 1, with its own rope base.
    sliding_window: int | None
    sliding_pattern: int
    rope_base_sliding: float
    attention_scale: float
    embedding_scale: float
    activation: str  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    qkv_bias: bool
    qk_norm: bool
    post_norms: bool  # norms after attention and after the FFN (Gemma 2/3)
    tied_output: bool

    @property
    def n_query_groups(self) -> int:
        return self.n_heads // self.n_kv_heads

    def layer_is_sliding(self, layer: int) -> bool:
        if self.sliding_window is None or self.sliding_pattern <= 0:
            return False
        return layer % self.sliding_pattern < self.sliding_pattern - 1

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], *, tensor_names: frozenset[str]) -> ModelConfig:
        arch = metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFileError("missing metadata key general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )

        def get(key: str, default: Any = ...) -> Any:
            value = metadata.get(f"{arch}.{key}", default)
            if value is ...:
                raise ModelFileError(f"missing metadata key {arch}.{key}")
            return value

        d_model = int(get("embedding_length"))
        n_heads = int(get("attention.head_count"))
        n_kv_heads = int(get("attention.head_count_kv", n_heads))
        head_dim = int(get("attention.key_length", d_model // n_heads))
        value_dim = int(get("attention.value_length", head_dim))
        tokens = metadata.get("tokenizer.ggml.tokens")
        vocab_size = int(get("vocab_size", len(tokens) if isinstance(tokens, list) else 0))
        if vocab_size <= 0:
            raise ModelFileError(f"missing metadata key {arch}.vocab_size")
        if n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ModelFileError(f"head_count {n_heads} is not a multiple of head_count_kv {n_kv_heads}")
        scaling_type = metadata.get(f"{arch}.rope.scaling.type", "none")
        rope_scale = 1.0
        if scaling_type == "linear":
            rope_scale = 1.0 / float(get("rope.scaling.factor", 1.0))
        elif scaling_type not in ("none", None):
            raise UnsupportedModelError(f"unsupported rope scaling type {scaling_type!r}")

        is_gemma3 = arch == "gemma3"
        sliding_window = get("attention.sliding_window", None) if is_gemma3 else None
        return cls(
            architecture=arch,
            n_layers=int(get("block_count")),
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            value_dim=value_dim,
            ffn_dim=int(get("feed_forward_length")),
            vocab_size=vocab_size,
            context_length=int(get("context_length")),
            rms_eps=float(get("attention.layer_norm_rms_epsilon")),
            # llama.cpp llama_model_rope_type(): llama uses NORM; qwen2 and gemma3 NEOX.
            rope_style="norm" if arch == "llama" else "neox",
            rope_dims=int(get("rope.dimension_count", head_dim)),
            rope_base=float(get("rope.freq_base", 10000.0)),
            rope_scale=rope_scale,
            sliding_window=int(sliding_window) if sliding_window else None,
            # llama-model.cpp (LLM_ARCH_GEMMA3): hparams.set_swa_pattern(6), and local
            # layers use rope_freq_base_train_swa = 10000 with scale 1.
            sliding_pattern=6 if is_gemma3 else 0,
            rope_base_sliding=10000.0 if is_gemma3 else float(get("rope.freq_base", 10000.0)),
            # Gemma 3 (all but 27B) scales queries by 1/sqrt(key_length).
            attention_scale=1.0 / math.sqrt(head_dim),
            embedding_scale=math.sqrt(d_model) if is_gemma3 else 1.0,
            activation="gelu_tanh" if is_gemma3 else "silu",
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            post_norms="blk.0.post_attention_norm.weight" in tensor_names,
            tied_output="output.weight" not in tensor_names,
        )
