"""F32 copies of GGUF models are exact and reproducible, and the F32 fixtures keep their schema.

The F32 fixtures (tests/fixtures/llamacpp/*-f32.json) are llama.cpp's logits on the F32
copies that tests/model_variants.py writes, recorded by tools/make_fixtures.py. The default
tests here need neither llama.cpp nor the real model files.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from tests.conftest import load_fixture
from tests.model_variants import f32_variant_path, write_f32_variant
from tests.tiny_models import TINY_SPECS

TinyModel = Callable[[str], Path]
# real model -> the conftest fixture giving its installed GGUF path
REAL_MODELS = {"smollm2-135m": "smollm2_path", "gemma3-270m": "gemma3_path"}
F32_HEADER_KEYS = {
    "llama_cpp_python_version", "n_ctx", "n_batch", "n_threads", "flash_attn", "kv_cache_type",
    "model", "variant", "gguf_version", "source_file", "source_sha256", "variant_sha256",
    "n_vocab", "top_k", "probe_seed", "probe_token_ids", "decimals", "cases",
}  # fmt: skip
F32_CASES = ["raw_paragraph", "chat_multi_turn", "raw_fact"]
TOP_K = 20
PROBES = 16


def field_values(reader: GGUFReader) -> dict[str, tuple[list[str], Any]]:
    """key -> (value type names, contents) for every key-value and header field."""
    return {
        name: ([value_type.name for value_type in field.types], field.contents())
        for name, field in reader.fields.items()
    }


@pytest.mark.parametrize("spec_name", sorted(TINY_SPECS))
def test_f32_variant_is_reproducible_and_exact(tiny_model: TinyModel, tmp_path: Path, spec_name: str) -> None:
    source = tiny_model(spec_name)
    first = write_f32_variant(source, tmp_path / "first.gguf")
    second = write_f32_variant(source, tmp_path / "second.gguf")
    assert first.read_bytes() == second.read_bytes()

    original, variant = GGUFReader(source), GGUFReader(first)
    assert field_values(variant) == field_values(original)
    assert list(variant.fields) == list(original.fields)
    assert [tensor.name for tensor in variant.tensors] == [tensor.name for tensor in original.tensors]
    for before, after in zip(original.tensors, variant.tensors, strict=True):
        assert after.tensor_type == GGMLQuantizationType.F32, after.name
        assert list(after.shape) == list(before.shape), after.name
        expected = dequantize(before.data, before.tensor_type).astype(np.float32)
        np.testing.assert_array_equal(after.data.reshape(expected.shape), expected, err_msg=after.name)


def test_f32_variant_path_writes_once_then_reuses(tiny_model: TinyModel, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    source = tiny_model("llama-tiny")
    path = f32_variant_path(source, cache)
    stat = path.stat()
    assert path.read_bytes() == write_f32_variant(source, tmp_path / "direct.gguf").read_bytes()
    assert f32_variant_path(source, cache) == path
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_ino == stat.st_ino
    assert sorted(cache.iterdir()) == [path], "a temporary file was left behind"

    # Another file under the same name gets its own copy: the cache is keyed on content.
    changed = tmp_path / "other" / source.name
    changed.parent.mkdir()
    shutil.copyfile(tiny_model("qwen2-tiny"), changed)
    other = f32_variant_path(changed, cache)
    assert other != path and len(list(cache.iterdir())) == 2


def check_position(position: dict[str, Any], fixture: dict[str, Any]) -> None:
    top = position["top"]
    assert len(top) == TOP_K
    ids = [token for token, _ in top]
    logits = [logit for _, logit in top]
    assert len(set(ids)) == TOP_K and all(0 <= token < fixture["n_vocab"] for token in ids)
    assert logits == sorted(logits, reverse=True)
    probe_logits = position["probe_logits"]
    assert len(probe_logits) == PROBES and max(probe_logits) <= logits[0]
    # A probe id that made the top-20 carries the same logit in both lists.
    in_top = dict(map(tuple, top))
    for token, logit in zip(fixture["probe_token_ids"], probe_logits, strict=True):
        assert in_top.get(token, logit) == logit
    # logsumexp over the vocab lies between the top logit and top + log(n_vocab).
    assert logits[0] <= position["logsumexp"] <= logits[0] + math.log(fixture["n_vocab"])


@pytest.mark.parametrize("model", sorted(REAL_MODELS))
def test_f32_fixture_schema(model: str) -> None:
    fixture = load_fixture(f"{model}-f32")
    source = load_fixture(model)
    assert fixture.keys() >= F32_HEADER_KEYS
    assert (fixture["model"], fixture["variant"], fixture["kv_cache_type"]) == (model, "f32", "f32")
    assert fixture["source_sha256"] == source["model_file_sha256"]
    assert fixture["source_file"] == source["model_file"]
    assert fixture["n_vocab"] == source["n_vocab"] and fixture["top_k"] == TOP_K
    probes = fixture["probe_token_ids"]
    assert len(set(probes)) == PROBES and probes == sorted(probes)
    assert 0 <= probes[0] < probes[-1] < fixture["n_vocab"]
    source_cases = {case["name"]: case for case in source["cases"]}
    assert [case["name"] for case in fixture["cases"]] == F32_CASES
    for case in fixture["cases"]:
        assert case["prompt_token_ids"] == source_cases[case["name"]]["prompt_token_ids"]
        assert len(case["positions"]) == len(case["prompt_token_ids"])
        for position in case["positions"]:
            check_position(position, fixture)


@pytest.mark.slow
@pytest.mark.realmodel
@pytest.mark.parametrize("model", sorted(REAL_MODELS))
def test_f32_variant_of_real_model_is_the_recorded_one(
    model: str, data_dir: Path, request: pytest.FixtureRequest
) -> None:
    source = request.getfixturevalue(REAL_MODELS[model])
    path = f32_variant_path(source, data_dir / "variants")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    assert digest.hexdigest() == load_fixture(f"{model}-f32")["variant_sha256"]
