"""Architecture configs from GGUF metadata, and the errors for what swarm cannot run."""

from __future__ import annotations

import pytest

from swarm.errors import ModelFileError, UnsupportedModelError
from swarm.gguf_file import GGUFFile
from swarm.model_config import ModelConfig


def _config(path):
    gguf = GGUFFile.open(path)
    return ModelConfig.from_metadata(gguf.metadata, tensor_names=frozenset(gguf.tensors))


def test_llama_tiny(tiny_model):
    config = _config(tiny_model("llama-tiny"))
    assert config.rope_style == "norm"
    assert config.tied_output
    assert not config.qkv_bias and not config.qk_norm and not config.post_norms
    assert config.activation == "silu"


def test_qwen2_tiny(tiny_model):
    config = _config(tiny_model("qwen2-tiny"))
    assert config.rope_style == "neox"
    assert config.qkv_bias
    assert not config.tied_output


def test_gemma3_tiny(tiny_model):
    config = _config(tiny_model("gemma3-tiny"))
    assert config.qk_norm and config.post_norms
    assert config.activation == "gelu_tanh"
    assert config.embedding_scale == pytest.approx(config.d_model**0.5)
    sliding = [config.layer_is_sliding(i) for i in range(config.n_layers)]
    assert sliding[:6] == [True] * 5 + [False]


@pytest.mark.realmodel
def test_real_model_configs(smollm2_path, gemma3_path, data_dir):
    smol = ModelConfig.from_metadata(
        GGUFFile.open(smollm2_path, data_dir / "cache").metadata,
        tensor_names=frozenset(GGUFFile.open(smollm2_path, data_dir / "cache").tensors),
    )
    assert (smol.n_layers, smol.d_model, smol.n_heads, smol.n_kv_heads, smol.head_dim) == (30, 576, 9, 3, 64)
    assert smol.tied_output and smol.rope_base == 100000.0
    gemma_file = GGUFFile.open(gemma3_path, data_dir / "cache")
    gemma = ModelConfig.from_metadata(gemma_file.metadata, tensor_names=frozenset(gemma_file.tensors))
    assert (gemma.n_layers, gemma.d_model, gemma.head_dim, gemma.n_kv_heads) == (18, 640, 256, 1)
    assert gemma.sliding_window == 512 and gemma.rope_base == 1e6 and gemma.rope_base_sliding == 1e4
    assert [i for i in range(18) if not gemma.layer_is_sliding(i)] == [5, 11, 17]


def test_unknown_architecture_is_named():
    with pytest.raises(UnsupportedModelError, match="'mamba'"):
        ModelConfig.from_metadata({"general.architecture": "mamba"}, tensor_names=frozenset())


def test_missing_key_is_named():
    metadata = {"general.architecture": "llama", "llama.embedding_length": 64}
    with pytest.raises(ModelFileError, match=r"llama\.attention\.head_count"):
        ModelConfig.from_metadata(metadata, tensor_names=frozenset())


def test_missing_architecture():
    with pytest.raises(ModelFileError, match=r"general\.architecture"):
        ModelConfig.from_metadata({}, tensor_names=frozenset())
