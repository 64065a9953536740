"""The architecture on real weights, exactly: F32 copies of SmolLM2 and Gemma 3.

On these copies llama.cpp does plain f32 arithmetic (F32 weights and KV cache), so
any difference beyond float rounding would be a mistake in our model math: rope,
norms, attention, sliding windows, embedding scale. tools/make_fixtures.py ran
llama.cpp on the same copies (their sha256 is in the fixture) and kept the top-20
logits and 16 probe logits at every prompt position.
"""

from __future__ import annotations

import numpy as np
import pytest

from swarm.engine import Engine, EngineSettings
from swarm.gguf_file import GGUFFile
from swarm.model_config import ModelConfig
from tests.conftest import load_fixture
from tests.model_variants import f32_variant_path

# SmolLM2 agrees to ~1e-4. Gemma 3's residual (~1e-2) is ggml computing GELU through
# an f16 lookup table even on F32 models.
TOLERANCE = {"smollm2-135m": 2e-3, "gemma3-270m": 3e-2}


@pytest.mark.realmodel
@pytest.mark.slow
@pytest.mark.parametrize("model_name", sorted(TOLERANCE))
def test_f32_copies_match_llama_cpp_exactly(opened_models, data_dir, model_name):
    fixture = load_fixture(f"{model_name}-f32")
    variant = f32_variant_path(opened_models(model_name).path, data_dir / "variants")
    gguf = GGUFFile.open(variant, data_dir / "cache")
    config = ModelConfig.from_metadata(gguf.metadata, tensor_names=frozenset(gguf.tensors))
    engine = Engine.load(gguf, config, settings=EngineSettings(kv_cache="f32"))
    probes = np.asarray(fixture["probe_token_ids"])
    for case in fixture["cases"]:
        prompt = np.asarray(case["prompt_token_ids"], np.int32)
        logits, _ = engine.forward(prompt, 0, engine.new_cache(256), all_logits=True)
        for position, expected in enumerate(case["positions"]):
            top_ids = np.asarray([token for token, _ in expected["top"]])
            top_logits = np.asarray([logit for _, logit in expected["top"]])
            worst = max(
                np.abs(logits[position, top_ids] - top_logits).max(),
                np.abs(logits[position, probes] - np.asarray(expected["probe_logits"])).max(),
            )
            assert worst <= TOLERANCE[model_name], f"{case['name']} position {position}: {worst:.5f}"
            assert int(np.argmax(logits[position])) == top_ids[0]
