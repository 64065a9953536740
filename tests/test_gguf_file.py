"""GGUF reading: metadata cache, memory-mapped tensor bytes, and bad files."""

from __future__ import annotations

import numpy as np
import pytest

from swarm.errors import ModelFileError
from swarm.gguf_file import GGUFFile


def test_reads_metadata_and_tensor_bytes(tiny_model, tmp_path):
    path = tiny_model("llama-tiny")
    gguf = GGUFFile.open(path, tmp_path)
    assert gguf.architecture == "llama"
    info = gguf.tensor_info("blk.0.attn_q.weight")
    raw = gguf.tensor_bytes("blk.0.attn_q.weight")
    assert raw.shape == (info.rows, info.row_bytes)
    assert raw.dtype == np.uint8


def test_cache_gives_the_same_answer_as_a_fresh_parse(tiny_model, tmp_path):
    path = tiny_model("qwen2-tiny")
    first = GGUFFile.open(path, tmp_path)
    assert list((tmp_path / "gguf").glob("*.json")), "the parse was not cached"
    second = GGUFFile.open(path, tmp_path)
    assert second.metadata == first.metadata
    assert second.tensors == first.tensors


def test_damaged_cache_is_ignored(tiny_model, tmp_path):
    path = tiny_model("llama-tiny")
    GGUFFile.open(path, tmp_path)
    for entry in (tmp_path / "gguf").glob("*.json"):
        entry.write_text("{not json")
    assert GGUFFile.open(path, tmp_path).architecture == "llama"


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        GGUFFile.open(tmp_path / "absent.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("hello, this is text")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        GGUFFile.open(path)


@pytest.mark.parametrize("keep_fraction", [0.5, 0.999])
def test_truncated_file(tiny_model, tmp_path, keep_fraction):
    data = tiny_model("llama-tiny").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(ModelFileError, match=r"truncated|cannot parse"):
        GGUFFile.open(path)


def test_truncated_header(tiny_model, tmp_path):
    data = tiny_model("llama-tiny").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:100])
    with pytest.raises(ModelFileError):
        GGUFFile.open(path)


def test_missing_tensor_is_named(tiny_model):
    gguf = GGUFFile.open(tiny_model("llama-tiny"))
    with pytest.raises(ModelFileError, match=r"blk\.99\.attn_q\.weight"):
        gguf.tensor_bytes("blk.99.attn_q.weight")
