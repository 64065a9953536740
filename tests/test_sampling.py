"""Sampling: greedy, the filters, penalties, seeds, and parameter validation."""

from __future__ import annotations

import numpy as np
import pytest

from swarm.errors import InvalidRequestError
from swarm.sampling import Sampler, SamplingParams, log_softmax, top_logprobs

LOGITS = np.array([1.0, 3.0, 2.5, -1.0, 0.0, 2.9], np.float32)


def _draws(params: SamplingParams, count: int = 300) -> set[int]:
    sampler = Sampler(params)
    return {sampler.sample(LOGITS) for _ in range(count)}


def test_greedy_is_argmax():
    assert Sampler(SamplingParams(temperature=0)).sample(LOGITS) == 1


def test_top_k_limits_the_candidates():
    assert _draws(SamplingParams(temperature=5.0, top_k=2, top_p=1.0, min_p=0.0, seed=1)) == {1, 5}


def test_top_p_keeps_the_smallest_set_reaching_p():
    # Probabilities at T=1 of the sorted logits 3.0, 2.9, 2.5, ...: the first alone is < 0.5.
    draws = _draws(SamplingParams(temperature=1.0, top_k=0, top_p=0.5, min_p=0.0, seed=2))
    assert draws == {1, 5}


def test_min_p_drops_unlikely_tokens():
    draws = _draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5, seed=3))
    assert draws == {1, 5, 2}


def test_seed_reproduces_a_run():
    params = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    first = [Sampler(params).sample(LOGITS) for _ in range(1)]
    runs = []
    for _ in range(2):
        sampler = Sampler(params)
        runs.append([sampler.sample(LOGITS) for _ in range(50)])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 1, "temperature 1.5 should not always pick one token"
    assert first[0] == runs[0][0]


def test_repetition_penalty_discourages_recent_tokens():
    params = SamplingParams(temperature=0, repetition_penalty=1.5)
    assert Sampler(params).sample(LOGITS, history=[1]) == 5
    assert Sampler(params).sample(LOGITS, history=[]) == 1


def test_top_logprobs_are_sorted_and_normalized():
    logprobs = log_softmax(LOGITS)
    top = top_logprobs(logprobs, 3)
    assert [token for token, _ in top] == [1, 5, 2]
    assert np.isclose(np.exp(logprobs).sum(), 1.0)
    assert top[0][1] == pytest.approx(float(logprobs[1]))


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", 2.0),
        ("max_tokens", 0),
        ("top_logprobs", 50),
        ("repetition_penalty", 0.0),
        ("stop", ("",)),
    ],
)
def test_bad_parameters_are_rejected(field, value):
    with pytest.raises(InvalidRequestError, match=field.split("_")[0]):
        SamplingParams(**{field: value})


def test_dict_round_trip_and_unknown_fields():
    params = SamplingParams(temperature=0.3, stop=("\n\n",), seed=7)
    assert SamplingParams.from_dict(params.to_dict()) == params
    with pytest.raises(InvalidRequestError, match="frequency"):
        SamplingParams.from_dict({"frequency": 1})
