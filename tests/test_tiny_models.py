"""Tiny GGUF models regenerate exactly, and the llama.cpp fixtures keep their schema.

The fixtures under tests/fixtures/llamacpp were recorded by tools/make_fixtures.py; these
tests need neither llama.cpp nor the real model files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from tests.conftest import FIXTURES, load_fixture
from tests.tiny_models import PROMPT_LENGTH, TINY_SPECS, VOCAB_SIZE, tiny_prompt

TinyModel = Callable[[str], Path]
REAL_MODELS = ("smollm2-135m", "gemma3-270m")
SPEC_NAMES = sorted(TINY_SPECS)
HEADER_KEYS = {"llama_cpp_python_version", "model_file", "model_file_sha256", "n_ctx", "n_threads"}
CASE_KEYS = {"name", "kind", "text", "add_bos", "prompt_token_ids", "token_ids", "steps"}


def tiny_fixture(spec_name: str) -> dict[str, Any]:
    return load_fixture(f"tiny-{spec_name}")


@pytest.mark.parametrize("spec_name", SPEC_NAMES)
def test_tiny_model_regenerates_byte_identically(tiny_model: TinyModel, spec_name: str) -> None:
    digest = hashlib.sha256(tiny_model(spec_name).read_bytes()).hexdigest()
    assert digest == tiny_fixture(spec_name)["model_file_sha256"]


@pytest.mark.parametrize("spec_name", SPEC_NAMES)
def test_tiny_model_tensors_dequantize_to_small_finite_values(tiny_model: TinyModel, spec_name: str) -> None:
    spec = TINY_SPECS[spec_name]
    reader = GGUFReader(tiny_model(spec_name))
    names = {tensor.name for tensor in reader.tensors}
    assert ("output.weight" in names) != spec.tied_output
    assert f"blk.{spec.n_layer - 1}.ffn_down.weight" in names
    types = set()
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type)
        assert values.size == int(np.prod(tensor.shape)), tensor.name
        assert np.isfinite(values).all(), tensor.name
        if tensor.name.endswith("norm.weight"):
            assert tensor.tensor_type == GGMLQuantizationType.F32
            assert 0.0 < float(np.mean(values)) < 10.0, tensor.name
        elif not tensor.name.endswith(".bias"):
            assert 0.01 < float(np.std(values)) < 0.5, tensor.name
            types.add(tensor.tensor_type.name)
    assert set(spec.weight_types) <= types


def test_gemma3_tiny_sliding_layers_follow_llama_cpp_rule() -> None:
    spec = TINY_SPECS["gemma3-tiny"]
    # set_swa_pattern(6, dense_first=false): every 6th layer, counting from 1, is global.
    assert [spec.is_sliding(layer) for layer in range(spec.n_layer)] == [
        True, True, True, True, True, False, True,
    ]  # fmt: skip
    assert spec.rope_base_for(0) == 10000.0
    assert spec.rope_base_for(5) == spec.rope_base == 1e6


@pytest.mark.parametrize("spec_name", SPEC_NAMES)
def test_tiny_fixture_schema(spec_name: str) -> None:
    fixture = tiny_fixture(spec_name)
    assert fixture.keys() >= HEADER_KEYS
    spec_fields = json.loads(json.dumps(dataclasses.asdict(TINY_SPECS[spec_name])))
    assert fixture["spec"] == spec_fields, "spec changed: rerun tools/make_fixtures.py"
    assert fixture["n_vocab"] == VOCAB_SIZE
    assert fixture["prompt_token_ids"] == tiny_prompt(spec_name)
    prompt_logits = np.array(fixture["prompt_logits"])
    decode_logits = np.array(fixture["decode_logits"])
    token_ids = fixture["token_ids"]
    assert prompt_logits.shape == (PROMPT_LENGTH, VOCAB_SIZE)
    assert decode_logits.shape == (len(token_ids), VOCAB_SIZE) == (12, VOCAB_SIZE)
    # token i+1 is the argmax of the logits after feeding token i
    assert token_ids[0] == int(np.argmax(prompt_logits[-1]))
    assert token_ids[1:] == [int(row) for row in np.argmax(decode_logits[:-1], axis=1)]
    assert len(set(token_ids)) > 3, "greedy output is degenerate"


def check_case(case: dict[str, Any], fixture: dict[str, Any]) -> None:
    assert case.keys() >= CASE_KEYS, case["name"]
    assert case["add_bos"] == fixture["add_bos"]
    prompt_ids = case["prompt_token_ids"]
    assert prompt_ids and all(0 <= token < fixture["n_vocab"] for token in prompt_ids)
    if case["add_bos"]:
        assert prompt_ids[0] == fixture["bos_token_id"]
    token_ids = case["token_ids"]
    eog = set(fixture["eog_token_ids"])
    assert len(token_ids) == fixture["max_new_tokens"] or token_ids[-1] in eog, case["name"]
    assert not eog & set(token_ids[:-1]), case["name"]
    assert len(case["steps"]) == len(token_ids)
    for token, step in zip(token_ids, case["steps"], strict=True):
        top = step["top"]
        assert len(top) == 5 and top[0][0] == token
        logprobs = [logprob for _, logprob in top]
        assert logprobs == sorted(logprobs, reverse=True) and logprobs[0] <= 0.0
        assert step["gap"] >= 0.0
    if case["kind"] == "chat":
        assert case["messages"][-1]["content"] == case["text"]
        assert case["rendered"].count(case["messages"][-1]["content"].strip()) >= 1


@pytest.mark.parametrize("model", REAL_MODELS)
def test_real_model_fixture_schema(model: str) -> None:
    fixture = load_fixture(model)
    assert fixture.keys() >= HEADER_KEYS
    kinds = [case["kind"] for case in fixture["cases"]]
    assert kinds.count("raw") >= 6 and kinds.count("chat") >= 6
    assert len({case["name"] for case in fixture["cases"]}) == len(kinds)
    for case in fixture["cases"]:
        check_case(case, fixture)
    assert len(fixture["tokenize"]) >= 10
    for entry in fixture["tokenize"]:
        assert entry["token_ids"] and entry["add_bos"] == fixture["add_bos"]


def test_fixture_files_are_small() -> None:
    files = sorted(FIXTURES.glob("*.json"))
    expected = {f"{name}.json" for name in REAL_MODELS}
    expected |= {f"tiny-{name}.json" for name in SPEC_NAMES}
    expected |= {f"{name}-f32.json" for name in REAL_MODELS}
    assert {path.name for path in files} == expected
    for path in files:
        assert path.stat().st_size < 1_000_000, path.name
