"""Deterministic tiny random GGUF models that llama.cpp loads.

Owns `TINY_SPECS` and `write_tiny_model`: a GGUF of 0.1-3 MB per spec, byte for
byte the same on every run (numpy `default_rng(spec.seed)` draws everything), so the
reference logits that `tools/make_fixtures.py` records from llama.cpp stay valid without
committing the model files. Imports only numpy and gguf-py; never the engine.

What llama.cpp does per architecture (vendored llama.cpp in llama-cpp-python 0.3.36), which
an engine must mirror to match the fixtures:

* All archs: RMSNorm is `ggml_rms_norm(x, eps) * w` (`llm_graph_context::build_norm`) with
  eps from `<arch>.attention.layer_norm_rms_epsilon`. When `output.weight` is absent the
  LM head is `token_embd.weight` (`TENSOR_DUPLICATED` in `load_arch_tensors`). The CPU
  backend quantizes activations before every quantized matmul (`type_traits_cpu[..]
  .vec_dot_type`: Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1, Q8_K for K-quants, F16 for
  F16 weights) and the default KV cache stores K and V as F16, so expect ~1e-3 relative
  differences from an exact float32 engine; the fixtures record top-1/top-2 gaps so tests
  can tell near-ties from real mismatches.
* `llama` (`llama_model_llama::graph`): rope NORM (`llama_model_rope_type` ->
  LLAMA_ROPE_TYPE_NORM: rotates adjacent pairs (x[2i], x[2i+1]) as stored in the GGUF;
  the HF converter permuted q/k so this equals HF's rotate_half). Attention scale
  1/sqrt(head_dim) (`kq_scale`, unless `f_attention_scale` is set). FFN
  `silu(gate(x)) * up(x)` then down (`build_ffn`, LLM_FFN_SILU, LLM_FFN_PAR).
  `rope.dimension_count` must equal head_dim for llama (`load_hparams` throws otherwise).
* `qwen2` (`llama_model_qwen2::graph`): like llama but rope NEOX (pairs (x[i], x[i+d/2]))
  and q/k/v biases added right after the projections, before rope.
* `gemma3` (`llama_model_gemma3::graph`): rope NEOX. Token embeddings are scaled by
  sqrt(n_embd) in float32 (`ggml_scale(inpL, sqrtf(n_embd))`). Norm weights are used as
  stored: the converter already folded Gemma's (1 + w) into the file. Per layer:
  x -> attn_norm -> q/k/v; q_norm and k_norm are RMSNorms over head_dim applied before
  rope; Q is multiplied by `f_attention_scale` = 1/sqrt(key_length) (1/sqrt(n_embd/n_head)
  only for the 62-layer 27B) and `build_attn` then uses kq_scale 1.0; the attention output
  goes through `post_attention_norm` before the residual add; then ffn_norm, GeGLU
  `gelu_tanh(gate) * up` (`ggml_geglu_split`; the CPU evaluates gelu through an F16 lookup
  table, GGML_GELU_FP16 in ggml-cpu/vec.h), `post_ffw_norm`, residual add. Final
  `output_norm`, LM head, optional `final_logit_softcapping` (absent -> off).
  Sliding window (`llama_model_gemma3::load_arch_hparams`): if
  `gemma3.attention.sliding_window` > 0, LLAMA_SWA_TYPE_STANDARD with
  `load_swa_pattern(ml, 6)` -> `llama_hparams::set_swa_pattern(6, dense_first=false)`:
  layer il is sliding iff il % 6 < 5, so layers 5, 11, 17, ... are global (a
  `gemma3.attention.sliding_window_pattern` key overrides this). The mask
  (`llama_hparams::is_masked_swa`) hides key position p0 from query p1 when
  p1 - p0 >= sliding_window: a query sees itself and the window-1 tokens before it.
  Rope base: global layers use `gemma3.rope.freq_base`; sliding layers use
  `gemma3.rope.freq_base_swa` when present, else 10000 (`rope_freq_base_train_swa`
  default in llama-hparams.h; `llama_model::get_rope_freq_base`). Gemma 3 270M's GGUF has
  no freq_base_swa key, so its local layers run at base 10000 and global ones at 1e6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import quantize

QK_K = 256

# Vocabulary shared by every spec: the 256 GPT-2 byte symbols, a few merges, four specials.
MERGES: tuple[str, ...] = (
    "Ġ t", "h e", "Ġ a", "i n", "e r", "o n", "Ġt he", "r e", "a n", "e n",
    "Ġ s", "Ġ w", "o r", "i s", "a t", "Ġ c", "e s", "Ġ o", "i t", "Ġ b",
    "a l", "e d", "Ġ f", "Ġ m", "n g", "in g", "Ġ p", "o u", "Ġ d", "l e",
    "Ġ h", "a r", "Ġ i", "Ġ l", "s t", "Ġ n", "c t", "Ġa n", "Ġan d", "Ġo f",
)  # fmt: skip
SPECIAL_TOKENS: tuple[str, ...] = ("<|bos|>", "<|eos|>", "<|pad|>", "<|sep|>")
N_NORMAL_TOKENS = 256 + len(MERGES)
VOCAB_SIZE = N_NORMAL_TOKENS + len(SPECIAL_TOKENS)
BOS_ID = N_NORMAL_TOKENS
EOS_ID = N_NORMAL_TOKENS + 1
PROMPT_LENGTH = 24

# Random K-quant blocks: byte offsets of the f16 super-block scale d and min dmin
# (ggml-common.h block_q*_K layouts), the dmin/d ratio that centres the weights (mean q
# times mean sub-scale over mean sub-min), and the std of a block with d = 1 after the
# sub-scale clamping in `_random_k_blocks` (measured once with gguf.quants.dequantize).
_K_LAYOUT: dict[GGMLQuantizationType, tuple[int, int | None, float, float]] = {
    GGMLQuantizationType.Q2_K: (80, 82, 1.5, 13.87),
    GGMLQuantizationType.Q3_K: (108, None, 0.0, 43.26),
    GGMLQuantizationType.Q4_K: (0, 2, 7.5, 63.53),
    GGMLQuantizationType.Q5_K: (0, 2, 15.5, 129.6),
    GGMLQuantizationType.Q6_K: (208, None, 0.0, 90.63),
}


@dataclass(frozen=True)
class TinySpec:
    """One tiny model: shapes, tensor types, and the llama.cpp behaviour it exercises."""

    name: str
    arch: str  # GGUF general.architecture
    seed: int
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    rope_base: float
    rms_eps: float
    tied_output: bool
    weight_types: tuple[str, ...]  # cycled over every layer matrix in file order
    embed_type: str
    output_type: str = "Q8_0"  # only when untied
    rope_type: str = "norm"  # llama_model_rope_type: "norm" (adjacent pairs) or "neox"
    qkv_bias: bool = False
    sliding_window: int = 0  # 0: every layer global
    swa_period: int = 0  # gemma3: every 6th layer (il % 6 == 5) is global
    rope_base_local: float = 10000.0  # sliding layers; llama.cpp's default, no GGUF key
    weight_std: float = 0.1
    embed_std: float = 0.1
    output_std: float = 0.1
    output_norm_gain: float = 1.0
    post_norm_gain: float = 1.0  # gemma3 post_attention_norm / post_ffw_norm

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim

    @property
    def attention_scale(self) -> float:
        """Multiplier on q.k: 1/sqrt(head_dim) for all three archs at these sizes."""
        return 1.0 / math.sqrt(self.head_dim)

    @property
    def embedding_scale(self) -> float:
        """gemma3 multiplies token embeddings by sqrt(n_embd); the others by 1."""
        return math.sqrt(self.n_embd) if self.arch == "gemma3" else 1.0

    def is_sliding(self, layer: int) -> bool:
        """llama_hparams::set_swa_pattern(period, dense_first=false)."""
        return self.sliding_window > 0 and layer % self.swa_period < self.swa_period - 1

    def rope_base_for(self, layer: int) -> float:
        return self.rope_base_local if self.is_sliding(layer) else self.rope_base


TINY_SPECS: dict[str, TinySpec] = {
    spec.name: spec
    for spec in (
        TinySpec(
            name="llama-tiny", arch="llama", seed=1, n_layer=3, n_embd=64, n_head=4,
            n_head_kv=2, head_dim=16, n_ff=128, rope_base=10000.0, rms_eps=1e-5,
            tied_output=True, weight_types=("Q8_0", "Q4_0", "Q4_1", "F16"), embed_type="Q8_0",
            weight_std=0.25, embed_std=0.3,
        ),
        TinySpec(
            name="mistral-tiny", arch="llama", seed=2, n_layer=2, n_embd=128, n_head=8,
            n_head_kv=2, head_dim=16, n_ff=256, rope_base=1e6, rms_eps=1e-5,
            tied_output=False, weight_types=("Q5_0", "Q5_1", "Q8_0"), embed_type="Q5_1",
            output_type="Q8_0", weight_std=0.1, embed_std=0.1, output_std=0.2,
        ),
        TinySpec(
            name="qwen2-tiny", arch="qwen2", seed=3, n_layer=2, n_embd=96, n_head=6,
            n_head_kv=2, head_dim=16, n_ff=160, rope_base=1e6, rms_eps=1e-6,
            tied_output=False, weight_types=("Q8_0", "Q4_0", "BF16", "Q5_1", "F16"),
            embed_type="F16", output_type="Q4_1", rope_type="neox", qkv_bias=True,
            weight_std=0.2, embed_std=0.1, output_std=0.3,
        ),
        # gemma3-tiny keeps token_embd in Q8_0: a K-quant super-block is one whole 256-wide
        # row, so its per-block scale jitter would let one token's row dominate the tied head.
        TinySpec(
            name="gemma3-tiny", arch="gemma3", seed=4, n_layer=7, n_embd=256, n_head=4,
            n_head_kv=2, head_dim=128, n_ff=512, rope_base=1e6, rms_eps=1e-6,
            tied_output=True, weight_types=("Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K"),
            embed_type="Q8_0", rope_type="neox", sliding_window=8, swa_period=6,
            weight_std=0.05, embed_std=0.03, output_norm_gain=4.0, post_norm_gain=2.0,
        ),
    )
}  # fmt: skip


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable symbol table (openai/gpt-2 encoder.py)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def tiny_vocab() -> tuple[list[str], list[int]]:
    """Token strings and token types, id order: bytes, merges, specials."""
    symbols = bytes_to_unicode()
    tokens = [symbols[byte] for byte in range(256)]
    known = set(tokens)
    for merge in MERGES:
        first, second = merge.split(" ")
        assert first in known and second in known, merge
        tokens.append(first + second)
        known.add(first + second)
    tokens += SPECIAL_TOKENS
    types = [TokenType.NORMAL] * N_NORMAL_TOKENS + [TokenType.CONTROL] * len(SPECIAL_TOKENS)
    return tokens, [int(kind) for kind in types]


def tiny_prompt(spec_name: str) -> list[int]:
    """The fixed 24-token prompt (ordinary tokens only, no BOS) the fixtures run."""
    rng = np.random.default_rng(1000 + TINY_SPECS[spec_name].seed)
    return [int(token) for token in rng.integers(0, N_NORMAL_TOKENS, PROMPT_LENGTH)]


def _random_k_blocks(
    rng: np.random.Generator, rows: int, cols: int, qtype: GGMLQuantizationType, std: float
) -> np.ndarray:
    """u8[rows, cols // 256 * type_size]: random K-quant super-blocks with sane scales.

    Quant bits are uniform random bytes; sub-block scales are clamped to small ranges so
    the f16 super-block scale d stays a normal f16 (no subnormals); d and dmin are jittered
    per super-block (0.5x..1.5x) so an engine that mixes up blocks cannot match.
    """
    d_offset, dmin_offset, dmin_ratio, unit_std = _K_LAYOUT[qtype]
    _, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // QK_K
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    if qtype in (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K):
        blocks[:, 4:12] &= 0x0F  # 6-bit scales and mins limited to 0..15
    if qtype == GGMLQuantizationType.Q6_K:
        scales = rng.integers(-8, 9, (n_blocks, 16), dtype=np.int8)
        blocks[:, 192:208] = scales.view(np.uint8)
    jitter = rng.uniform(0.5, 1.5, (n_blocks, 1))
    d = (jitter * (std / unit_std)).astype(np.float16)
    blocks[:, d_offset : d_offset + 2] = d.view(np.uint8)
    if dmin_offset is not None:
        dmin = (jitter * (dmin_ratio * std / unit_std)).astype(np.float16)
        blocks[:, dmin_offset : dmin_offset + 2] = dmin.view(np.uint8)
    return blocks.reshape(rows, -1)


def _matrix(
    rng: np.random.Generator, rows: int, cols: int, type_name: str, std: float
) -> tuple[np.ndarray, GGMLQuantizationType]:
    """A [rows, cols] weight (GGUF ne = [cols, rows]) encoded as `type_name`."""
    qtype = GGMLQuantizationType[type_name]
    if qtype in _K_LAYOUT:
        return _random_k_blocks(rng, rows, cols, qtype, std), qtype
    values = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(std)
    if qtype == GGMLQuantizationType.F32:
        return values, qtype
    if qtype == GGMLQuantizationType.F16:
        return values.astype(np.float16), qtype
    return quantize(values, qtype), qtype


def _norm(rng: np.random.Generator, size: int, gain: float = 1.0) -> np.ndarray:
    """f32[size] RMSNorm weight near `gain`, jittered so a skipped norm shows."""
    return (gain * (1.0 + 0.2 * rng.standard_normal(size))).astype(np.float32)


def tiny_tensors(spec: TinySpec) -> dict[str, tuple[np.ndarray, GGMLQuantizationType]]:
    """Every tensor of the model, in file order, as (data, GGML type)."""
    rng = np.random.default_rng(spec.seed)
    tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]] = {}
    f32 = GGMLQuantizationType.F32
    tensors["token_embd.weight"] = _matrix(rng, VOCAB_SIZE, spec.n_embd, spec.embed_type, spec.embed_std)
    type_cycle = 0
    for layer in range(spec.n_layer):
        prefix = f"blk.{layer}"
        tensors[f"{prefix}.attn_norm.weight"] = (_norm(rng, spec.n_embd), f32)
        matrices = (
            ("attn_q", spec.q_dim, spec.n_embd),
            ("attn_k", spec.kv_dim, spec.n_embd),
            ("attn_v", spec.kv_dim, spec.n_embd),
            ("attn_output", spec.n_embd, spec.q_dim),
            ("ffn_gate", spec.n_ff, spec.n_embd),
            ("ffn_up", spec.n_ff, spec.n_embd),
            ("ffn_down", spec.n_embd, spec.n_ff),
        )
        for name, rows, cols in matrices:
            type_name = spec.weight_types[type_cycle % len(spec.weight_types)]
            type_cycle += 1
            tensors[f"{prefix}.{name}.weight"] = _matrix(rng, rows, cols, type_name, spec.weight_std)
            if spec.qkv_bias and name in ("attn_q", "attn_k", "attn_v"):
                bias = (0.5 * rng.standard_normal(rows)).astype(np.float32)
                tensors[f"{prefix}.{name}.bias"] = (bias, f32)
        tensors[f"{prefix}.ffn_norm.weight"] = (_norm(rng, spec.n_embd), f32)
        if spec.arch == "gemma3":
            tensors[f"{prefix}.attn_q_norm.weight"] = (_norm(rng, spec.head_dim), f32)
            tensors[f"{prefix}.attn_k_norm.weight"] = (_norm(rng, spec.head_dim), f32)
            post_gain = spec.post_norm_gain
            tensors[f"{prefix}.post_attention_norm.weight"] = (_norm(rng, spec.n_embd, post_gain), f32)
            tensors[f"{prefix}.post_ffw_norm.weight"] = (_norm(rng, spec.n_embd, post_gain), f32)
    tensors["output_norm.weight"] = (_norm(rng, spec.n_embd, spec.output_norm_gain), f32)
    if not spec.tied_output:
        tensors["output.weight"] = _matrix(rng, VOCAB_SIZE, spec.n_embd, spec.output_type, spec.output_std)
    return tensors


def _write_metadata(writer: GGUFWriter, spec: TinySpec) -> None:
    """The keys llama.cpp's `load_hparams`/`load_arch_hparams`/`llama_vocab::load` read."""
    writer.add_name(spec.name)
    writer.add_context_length(512)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    writer.add_rope_freq_base(spec.rope_base)
    if spec.arch == "gemma3":
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
        writer.add_sliding_window(spec.sliding_window)
    else:
        writer.add_rope_dimension_count(spec.head_dim)
        writer.add_vocab_size(VOCAB_SIZE)
    tokens, token_types = tiny_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(list(MERGES))
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_pad_token_id(EOS_ID + 1)
    writer.add_add_bos_token(False)


def write_tiny_model(path: str | Path, spec_name: str) -> Path:
    """Write the GGUF for `spec_name` to `path` (a file, or a directory to put it in)."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{spec_name}.gguf"
    return write_spec(path, TINY_SPECS[spec_name])


def write_spec(path: Path, spec: TinySpec) -> Path:
    """Write `spec` (a `TINY_SPECS` entry or a `dataclasses.replace` of one) to `path`."""
    writer = GGUFWriter(path, spec.arch)
    _write_metadata(writer, spec)
    for name, (data, qtype) in tiny_tensors(spec).items():
        raw_dtype = None if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) else qtype
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
