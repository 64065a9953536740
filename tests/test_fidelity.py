"""Real models against llama.cpp: greedy tokens and top-5 log-probabilities.

tools/make_fixtures.py ran SmolLM2-135M (Q4_1) and Gemma 3 270M (Q4_K_M) through
llama.cpp on raw and chat prompts and stored its greedy tokens, the top-5 logprobs and
the top-1/top-2 logit gap at every step. We feed the same prompt token ids, follow
llama.cpp's tokens (so one early divergence cannot hide later agreement), and require
the same greedy choice at every step up to the first near tie, where 8-bit activation
rounding inside llama.cpp may legitimately flip the choice. A near tie is a top-1/top-2
logit gap under 0.5: llama.cpp's rounding noise moves single logits by up to 0.4 on
these models (measured below), so gaps of 0.14-0.33 were seen to flip.

Log-probabilities: llama.cpp's CPU backend rounds activations to 8 bits inside every
quantized product, and so does our default engine (kernels/cpu). That rounding is
chaotic across layers: a last-bit difference becomes a whole rounding step wherever a
value sits at a boundary, and the next layer's rounding spreads it. tools/fidelity_noise.py
measures it: our engine against itself with only RMS norm's row sum reordered (results
equal to the last bit) moves step-0 top-5 logprobs by up to 0.24 (mean 0.07) on
SmolLM2 and 0.27 (mean 0.06) on Gemma 3; against llama.cpp, 0.35 (0.10) and 0.79 (0.13).
So no engine short of a bit-for-bit copy of ggml's arithmetic gets within 0.05 of it on
these models. The tests below bound what holds instead: the top token's logprob within
0.25, every top-5 logprob within 0.15 x (1 + |logprob|), mean 0.15. The exactness of
the architecture itself is tested on F32 copies of the same models
(tests/test_real_f32.py), where llama.cpp does plain f32 arithmetic and agrees to 2e-3.
"""

from __future__ import annotations

import numpy as np
import pytest

from swarm.sampling import log_softmax
from tests.conftest import load_fixture

NEAR_TIE = 0.5
TOP1_TOLERANCE = 0.25  # |logprob difference| of llama.cpp's top token at step 0
RELATIVE_TOLERANCE = 0.15  # every top-5 entry: |difference| <= this x (1 + |logprob|)
MEAN_TOLERANCE = 0.15  # mean |difference| over all top-5 entries of all cases
MODELS = {"smollm2-135m": "smollm2-135m", "gemma3-270m": "gemma3-270m"}


def _cases(fixture_name: str) -> list[dict]:
    return load_fixture(fixture_name)["cases"]


def _follow(engine, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    """Our logits at every step while feeding llama.cpp's greedy tokens."""
    cache = engine.new_cache(engine.cache_capacity(len(prompt) + len(tokens)))
    logits, cache = engine.forward(np.asarray(prompt, np.int32), 0, cache)
    steps = [logits]
    for index, token in enumerate(tokens[:-1]):
        logits, cache = engine.forward(np.asarray([token], np.int32), len(prompt) + index, cache)
        steps.append(logits)
    return steps


@pytest.mark.realmodel
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_greedy_tokens_and_logprobs_match_llama_cpp(real_engines, model_name):
    engine = real_engines(model_name)
    cases = _cases(model_name)
    assert sum(c["kind"] == "raw" for c in cases) >= 6 and sum(c["kind"] == "chat" for c in cases) >= 6
    compared = 0
    differences = []
    for case in cases:
        tokens = case["token_ids"]
        ours = _follow(engine, case["prompt_token_ids"], tokens)
        for step, (logits, expected) in enumerate(zip(ours, case["steps"], strict=False)):
            if expected["gap"] < NEAR_TIE:
                break
            assert int(np.argmax(logits)) == tokens[step], (
                f"{case['name']}: step {step} chose {int(np.argmax(logits))}, llama.cpp {tokens[step]}"
            )
            compared += 1
        logprobs = log_softmax(ours[0])
        top = case["steps"][0]["top"]
        assert abs(logprobs[top[0][0]] - top[0][1]) <= TOP1_TOLERANCE, f"{case['name']}: top token"
        for token, reference in top:
            difference = abs(logprobs[token] - reference)
            differences.append(difference)
            assert difference <= RELATIVE_TOLERANCE * (1 + abs(reference)), (
                f"{case['name']}: step-0 logprob of token {token}: {logprobs[token]:.4f} vs {reference:.4f}"
            )
    assert np.mean(differences) <= MEAN_TOLERANCE
    assert compared >= 2 * len(cases), f"only {compared} steps compared before near ties"
