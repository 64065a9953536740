"""Sampling: greedy, the filters, penalties, seeds, and parameter validation."""

from __future__ import annotations

import numpy as np
import pytest

from swarm.errors import InvalidRequestError
from swarm.sampling import Sampler, SamplingParams, largest, log_softmax, token_logprobs

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
    logprob, top = token_logprobs(LOGITS, 1, 3)
    assert [token for token, _ in top] == [1, 5, 2]
    assert np.isclose(np.exp(logprobs).sum(), 1.0)
    assert top[0][1] == pytest.approx(float(logprobs[1]))
    assert logprob == pytest.approx(float(logprobs[1]))


def _vocabulary(size: int, seed: int) -> np.ndarray:
    """Logits shaped like a model's: a few likely tokens over a long tail, with ties."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(size).astype(np.float32) * 2
    logits[rng.integers(0, size, 12)] += 9
    logits[rng.integers(0, size, 50)] = np.float32(4.5)
    return logits


def _reference_distribution(params: SamplingParams, logits: np.ndarray) -> dict[int, float]:
    """The sampling chain written plainly: sort every token, then cut."""
    order = np.argsort(-logits.astype(np.float64), kind="stable")
    values = logits[order].astype(np.float64)
    if 0 < params.top_k < len(order):
        order, values = order[: params.top_k], values[: params.top_k]
    probs = np.exp(values - values[0])
    probs /= probs.sum()
    if params.top_p < 1.0:
        cut = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
        order, values, probs = order[:cut], values[:cut], probs[:cut]
    keep = probs >= params.min_p * probs[0]
    order, values = order[keep], values[keep]
    final = np.exp((values - values[0]) / params.temperature)
    return dict(zip(order.tolist(), (final / final.sum()).tolist(), strict=True))


@pytest.mark.parametrize("size", [6, 5000, 262_144])
def test_largest_is_a_stable_sort_cut(size):
    logits = _vocabulary(size, seed=size) if size > 6 else LOGITS
    expected = np.argsort(-logits, kind="stable")
    for count in (1, 3, 40, 1000, size, size + 5):
        assert largest(logits, count).tolist() == expected[:count].tolist()


def test_largest_with_nan_and_minus_infinity():
    logits = _vocabulary(50_000, seed=7)
    logits[::3] = -np.inf
    logits[5] = np.nan
    assert largest(logits, 40).tolist() == np.argsort(-logits, kind="stable")[:40].tolist()


@pytest.mark.parametrize("size", [16_384, 20_000, 50_000, 262_144])
@pytest.mark.parametrize(
    "pattern", ["plain", "ties", "nan", "nan group", "minus infinity", "best in the tail"]
)
def test_largest_of_a_large_vocabulary_by_groups(size, pattern):
    """The few largest of a large vocabulary come from groups' maxima: the same stable
    cut, whatever ties, NaNs (alone in a group too) and -inf the logits hold."""
    logits = _vocabulary(size, seed=size)
    columns = size // 64
    if pattern == "ties":
        logits = np.round(logits).astype(np.float32)  # long runs of equal values
    elif pattern == "nan":
        logits[::97] = np.nan
    elif pattern == "nan group":
        logits[5 : 64 * columns : columns] = np.nan  # every value of one group
    elif pattern == "minus infinity":
        logits[np.arange(size) % 5 != 0] = -np.inf
    elif pattern == "best in the tail":
        logits[-3:] = logits.max() + np.array([1, 3, 1], np.float32)
    expected = np.argsort(-logits, kind="stable")
    for count in (1, 7, 40, 64):
        assert largest(logits, count).tolist() == expected[:count].tolist(), count


def test_allowed_tokens_tie_by_token_id_after_the_penalty():
    logits = np.array([0, 0, 0, 2.0, 0, 3.0], np.float32)
    params = SamplingParams(temperature=0, repetition_penalty=1.5)  # 3.0 / 1.5 ties with 2.0
    masked = np.where(np.isin(np.arange(6), [3, 5]), logits, -np.inf).astype(np.float32)
    assert Sampler(params).sample(logits, [5], allowed=np.array([5, 3])) == 3
    assert Sampler(params).sample(masked, [5]) == 3


def test_top_p_finds_a_dominant_token_the_strided_sample_misses():
    logits = (np.random.default_rng(1).standard_normal(262_144) * 2).astype(np.float32)
    logits[7] += 25  # off the strided sample, and alone past p
    tokens, probs = Sampler(SamplingParams(top_k=0)).distribution(logits)
    assert tokens.tolist() == [7] and probs.tolist() == [1.0]


def test_largest_in_flat_and_masked_logits():
    flat = np.zeros(262_144, np.float32)
    flat[[9, 70_000, 200_000]] = 1.0
    masked = np.full(262_144, -np.inf, np.float32)
    masked[[5, 300, 100_000]] = [1.0, 3.0, 2.0]
    for logits in (flat, masked):
        for count in (2, 40):
            assert largest(logits, count).tolist() == np.argsort(-logits, kind="stable")[:count].tolist()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0),
        SamplingParams(seed=4),
        SamplingParams(temperature=2.0, top_k=3, top_p=1.0, min_p=0.0, seed=4),
    ],
)
def test_allowed_tokens_sample_as_if_the_rest_were_minus_infinity(params):
    logits = _vocabulary(49_152, seed=5)
    allowed = largest(logits, 300)[[3, 7, 120, 250]]  # what a constraint accepts, best first
    masked = np.full_like(logits, -np.inf)
    masked[allowed] = logits[allowed]
    ours, reference = Sampler(params), Sampler(params)
    draws = [ours.sample(logits, allowed=allowed) for _ in range(100)]
    assert draws == [reference.sample(masked) for _ in range(100)]
    assert set(draws) <= set(allowed.tolist())
    if not params.greedy:
        assert len(set(draws)) > 1


@pytest.mark.parametrize("size", [6, 49_152, 262_144])
@pytest.mark.parametrize(
    "chain",
    [
        {},  # the defaults: top-k 40, top-p 0.95, min-p 0.05
        {"top_k": 0},
        {"top_k": 0, "top_p": 0.5, "min_p": 0.0},
        {"top_k": 0, "top_p": 1.0},
        {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "temperature": 0.3},
        {"top_k": 3, "top_p": 1.0, "min_p": 0.0},
    ],
)
def test_the_chain_keeps_what_sorting_every_token_keeps(size, chain):
    params = SamplingParams(**chain)
    logits = _vocabulary(size, seed=1) if size > 6 else LOGITS
    tokens, probs = Sampler(params).distribution(logits)
    ours = dict(zip(tokens.tolist(), probs.tolist(), strict=True))
    reference = _reference_distribution(params, logits)
    assert ours.keys() == reference.keys()
    assert all(ours[token] == pytest.approx(p, rel=1e-9, abs=1e-15) for token, p in reference.items())


def test_token_logprobs_match_the_whole_array():
    logits = _vocabulary(262_144, seed=3)
    logprob, alternatives = token_logprobs(logits, 17, 5)
    logprobs = log_softmax(logits)
    assert logprob == pytest.approx(float(logprobs[17]), abs=1e-6)
    expected = np.argsort(-logprobs, kind="stable")[:5]
    assert [token for token, _ in alternatives] == expected.tolist()
    assert [value for _, value in alternatives] == pytest.approx(logprobs[expected].tolist(), abs=1e-6)


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
