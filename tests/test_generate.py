"""The generation loop on a tiny model: stop rules, budgets, context limits."""

from __future__ import annotations

import pytest

from swarm.engine import EngineSettings
from swarm.errors import ContextOverflowError, InvalidRequestError
from swarm.generate import Generator, StopScanner
from swarm.loader import open_model
from swarm.sampling import SamplingParams


@pytest.fixture(scope="module")
def generator(tiny_model, data_dir):
    model = open_model(str(tiny_model("llama-tiny")), data_dir)
    return Generator(model.engine(EngineSettings(max_context=64)), model.tokenizer)


def test_stop_scanner_holds_back_a_partial_stop():
    scanner = StopScanner(["END"])
    assert scanner.push("abc E") == "abc "
    assert scanner.push("N") == ""
    assert scanner.push("D and more") == ""
    assert scanner.stopped


def test_stop_scanner_releases_a_false_alarm():
    scanner = StopScanner(["END"])
    assert scanner.push("xE") == "x"
    assert scanner.push("Nx") == "ENx"
    assert not scanner.stopped


def test_max_tokens_ends_with_length(generator):
    result = generator.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(result.token_ids) == 5
    assert result.finish_reason == "length"


def test_greedy_is_deterministic(generator):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert generator.generate([5, 6, 7], params).token_ids == generator.generate([5, 6, 7], params).token_ids


def test_seeded_sampling_is_reproducible(generator):
    params = SamplingParams(
        temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=11, max_tokens=8, ignore_eos=True
    )
    assert generator.generate([5, 6], params).token_ids == generator.generate([5, 6], params).token_ids


def test_stop_string_truncates_the_text(generator):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    full = generator.generate([5, 6, 7], params)
    assert len(full.text) > 3
    stop = full.text[2:4]
    stopped = generator.generate(
        [5, 6, 7], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=(stop,))
    )
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.index(stop)]


def test_top_logprobs_per_token(generator):
    result = generator.generate(
        [5, 6], SamplingParams(temperature=0, max_tokens=4, top_logprobs=3, ignore_eos=True)
    )
    assert len(result.top_logprobs) == len(result.token_ids)
    for token, alternatives in zip(result.token_ids, result.top_logprobs, strict=True):
        assert len(alternatives) == 3
        assert alternatives[0][0] == token  # greedy picks the most likely


def test_budget_is_clamped_to_the_context(generator):
    result = generator.generate(
        list(range(5, 60)), SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    )
    assert len(result.token_ids) == 64 - 55
    assert result.finish_reason == "length"


def test_prompt_longer_than_the_context(generator):
    with pytest.raises(ContextOverflowError, match="prompt is too long"):
        generator.generate(list(range(5, 75)), SamplingParams(max_tokens=1))


def test_bad_prompts(generator):
    with pytest.raises(InvalidRequestError, match="empty"):
        generator.generate([], SamplingParams())
    with pytest.raises(InvalidRequestError, match="token ids"):
        generator.generate([10**7], SamplingParams())
