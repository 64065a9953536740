"""Shard sets: splitting a GGUF, the GGUF view over present shards, integrity checks."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from swarm.errors import ModelFileError
from swarm.gguf_file import GGUFFile
from swarm.shards import (
    EMBEDDING,
    HEADER_FILE,
    MANIFEST_FILE,
    ShardSet,
    describe,
    layer_of,
    select_shards,
    shard_command,
    split_gguf,
)
from tests.conftest import load_fixture

TINY = 0.01  # MiB: one layer per shard in every tiny model
SPECS = ["llama-tiny", "mistral-tiny", "qwen2-tiny", "gemma3-tiny"]


def _copy_subset(source_dir, target_dir, shards):
    """A node's directory: manifest, header and only the given shards."""
    target_dir.mkdir()
    for name in (MANIFEST_FILE, HEADER_FILE, *(f"shard_{index:03d}.bin" for index in shards)):
        shutil.copyfile(source_dir / name, target_dir / name)
    return target_dir


def _rewrite_manifest(directory, change):
    """Apply `change` to the manifest JSON and re-sign it, as a buggy writer would."""
    path = directory / MANIFEST_FILE
    raw = json.loads(path.read_text())
    change(raw)
    raw.pop("manifest_sha256", None)
    canonical = json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    raw["manifest_sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
    path.write_text(json.dumps(raw))


@pytest.fixture(scope="module")
def split_dirs(tiny_model, tmp_path_factory):
    """spec_name -> a directory holding that tiny model split one layer per shard."""
    made = {}

    def get(spec_name):
        if spec_name not in made:
            made[spec_name] = tmp_path_factory.mktemp(spec_name)
            split_gguf(tiny_model(spec_name), made[spec_name], shard_size_mb=TINY)
        return made[spec_name]

    return get


@pytest.mark.parametrize("spec_name", SPECS)
def test_split_serves_every_tensor_byte_for_byte(tiny_model, tmp_path, spec_name):
    source = tiny_model(spec_name)
    manifest = split_gguf(source, tmp_path, shard_size_mb=TINY)
    original = GGUFFile.open(source)
    view = ShardSet.open(tmp_path).as_gguf(tmp_path / "cache")
    assert view.metadata == original.metadata
    assert view.tensors == original.tensors
    for name in original.tensors:
        assert np.array_equal(view.tensor_bytes(name), original.tensor_bytes(name)), name
    assert (tmp_path / HEADER_FILE).read_bytes() == source.read_bytes()[: manifest.header_size]
    assert sorted(p.name for p in tmp_path.glob("shard_*")) == [s.file for s in manifest.shards]
    assert not list(tmp_path.glob("*.tmp"))
    assert manifest.source_sha256 == hashlib.sha256(source.read_bytes()).hexdigest()


@pytest.mark.parametrize("spec_name", SPECS)
def test_layout_is_layer_aligned(split_dirs, spec_name):
    manifest = ShardSet.open(split_dirs(spec_name)).manifest
    shards = manifest.shards
    assert len(shards) == manifest.block_count > 1  # the tiny budget gives each layer a shard
    assert [s.layers for s in shards] == [(n, n + 1) for n in range(manifest.block_count)]
    for shard in shards:
        for name in shard.tensors:
            layer = layer_of(name)
            assert layer is None or shard.layers[0] <= layer < shard.layers[1], name
            assert manifest.tensors[name].offset % 32 == 0
    assert manifest.tensors[EMBEDDING].shard == 0
    assert manifest.tensors["output_norm.weight"].shard == len(shards) - 1
    if manifest.tied_output:
        assert [c.name for c in shards[-1].copies] == [EMBEDDING]
        assert shards[-1].copies[0].offset % 32 == 0
    else:
        assert manifest.tensors["output.weight"].shard == len(shards) - 1
        assert not any(s.copies for s in shards)


def test_budget_packs_as_many_whole_layers_as_fit(tiny_model, tmp_path):
    budget_mb = 1.2
    manifest = split_gguf(tiny_model("gemma3-tiny"), tmp_path, shard_size_mb=budget_mb)
    budget = budget_mb * 2**20

    def layer_bytes(layer):
        sizes = [t.size for n, t in manifest.tensors.items() if layer_of(n) == layer]
        return sum(-(-size // 32) * 32 for size in sizes)

    shards = manifest.shards
    assert 1 < len(shards) < manifest.block_count
    for shard in shards:
        assert shard.size <= budget or shard.layers[1] - shard.layers[0] == 1
    for shard, following in itertools.pairwise(shards[:-1]):
        assert shard.size + layer_bytes(following.layers[0]) > budget  # the next layer did not fit


def test_a_model_within_the_budget_is_one_shard(tiny_model, tmp_path):
    manifest = split_gguf(tiny_model("gemma3-tiny"), tmp_path, shard_size_mb=100)
    assert [(s.layers, s.copies) for s in manifest.shards] == [((0, 7), ())]
    assert select_shards(manifest, (3, 7)) == [0]


def test_select_shards(split_dirs):
    tied = ShardSet.open(split_dirs("gemma3-tiny")).manifest  # 7 layers, one per shard
    assert select_shards(tied, (0, 7)) == list(range(7))
    assert select_shards(tied, (2, 4)) == [2, 3]
    assert select_shards(tied, (5, 7)) == [5, 6]  # the tied embedding's copy is in shard 6
    assert select_shards(tied, (0, 1)) == [0]
    untied = ShardSet.open(split_dirs("mistral-tiny")).manifest
    assert select_shards(untied, (1, 2)) == [1]
    with pytest.raises(ModelFileError, match="outside"):
        select_shards(tied, (3, 9))


@pytest.mark.parametrize("spec_name", ["llama-tiny", "mistral-tiny"])
def test_engine_runs_the_same_from_shards(split_dirs, tiny_model, tmp_path, spec_name):
    from swarm.engine import Engine, EngineSettings
    from swarm.model_config import ModelConfig

    def config_of(gguf):
        return ModelConfig.from_metadata(gguf.metadata, tensor_names=frozenset(gguf.tensors))

    settings = EngineSettings(kv_cache="f32")
    ids = np.asarray(load_fixture(f"tiny-{spec_name}")["prompt_token_ids"], np.int32)
    original = GGUFFile.open(tiny_model(spec_name))
    config = config_of(original)
    layers = config.n_layers
    split = split_dirs(spec_name)
    sharded = ShardSet.open(split).as_gguf()
    assert config_of(sharded) == config

    def run(gguf, layer_range, inputs):
        engine = Engine.load(gguf, config, layer_range, settings)
        return engine.forward(inputs, 0, engine.new_cache(256), all_logits=True)[0]

    assert np.array_equal(run(sharded, (0, layers), ids), run(original, (0, layers), ids))

    # A node holding only the last shard serves the last layers, head included.
    last = ShardSet.open(split).manifest.shards[-1]
    node = ShardSet.open(
        _copy_subset(split, tmp_path / "node", select_shards(sharded.shard_set.manifest, last.layers))
    )
    assert node.present_shards == [last.index]
    assert node.layers_held() == [last.layers]
    assert node.has_head
    assert node.has_embedding == config.tied_output  # only as the tied copy
    hidden = run(original, (0, last.layers[0]), ids)
    tail = run(node.as_gguf(), last.layers, hidden)
    assert np.array_equal(tail, run(original, last.layers, hidden))


def test_corrupt_shard_is_quarantined_and_never_served(split_dirs, tmp_path, caplog):
    from swarm.engine import Engine
    from swarm.model_config import ModelConfig

    directory = _copy_subset(split_dirs("llama-tiny"), tmp_path / "node", [0, 1, 2])
    shard = directory / "shard_001.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="swarm.shards"):
        shard_set = ShardSet.open(directory)
    assert "shard_001.bin" in caplog.text
    assert not shard.exists()
    assert (directory / "shard_001.bin.quarantine").exists()
    assert shard_set.present_shards == [0, 2]
    assert shard_set.layers_held() == [(0, 1), (2, 3)]
    gguf = shard_set.as_gguf()
    with pytest.raises(ModelFileError, match=r"layer 1 is not held here \(shard 1 quarantined"):
        gguf.tensor_bytes("blk.1.attn_q.weight")
    config = ModelConfig.from_metadata(gguf.metadata, tensor_names=frozenset(gguf.tensors))
    with pytest.raises(ModelFileError, match="layer 1"):
        Engine.load(gguf, config, (0, 3))
    # On the next start the quarantined shard is simply absent.
    assert ShardSet.open(directory).layers_held() == [(0, 1), (2, 3)]


def test_truncated_shard_is_caught_without_hashing(split_dirs, tmp_path):
    directory = _copy_subset(split_dirs("llama-tiny"), tmp_path / "node", [0, 1, 2])
    shard = directory / "shard_002.bin"
    shard.write_bytes(shard.read_bytes()[:-1])
    shard_set = ShardSet.open(directory, verify=False)
    assert shard_set.present_shards == [0, 1]
    assert not shard_set.has_head
    assert (directory / "shard_002.bin.quarantine").exists()


def test_missing_shards_are_a_subset_not_an_error(split_dirs, tmp_path):
    directory = _copy_subset(split_dirs("mistral-tiny"), tmp_path / "node", [1])
    shard_set = ShardSet.open(directory)
    assert shard_set.layers_held() == [(1, 2)]
    assert shard_set.has_head and not shard_set.has_embedding
    with pytest.raises(ModelFileError, match=r"token_embd\.weight is not held here \(shard 0 missing\)"):
        shard_set.as_gguf().tensor_bytes(EMBEDDING)


def test_tampered_manifest_fails_its_hash(split_dirs, tmp_path):
    directory = _copy_subset(split_dirs("llama-tiny"), tmp_path / "node", [0])
    path = directory / MANIFEST_FILE
    raw = json.loads(path.read_text())
    raw["shards"][1]["size"] += 1
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelFileError, match="manifest hash"):
        ShardSet.open(directory)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: raw["model"].pop("block_count"), "missing key block_count"),
        (lambda raw: raw["shards"][0].pop("sha256"), r"shards\[0\]: missing key sha256"),
        (lambda raw: raw["tensors"]["blk.0.attn_q.weight"].update(offset=0), "overlaps"),
        (lambda raw: raw["tensors"]["blk.0.attn_q.weight"].update(size=10**9), "overruns"),
        (lambda raw: raw["shards"][1].update(layers=[2, 3]), "do not follow"),
        (lambda raw: raw["shards"][0].update(file="../escape.bin"), "file name"),
        (lambda raw: raw["tensors"].pop("blk.2.attn_q.weight"), r"blk\.2\.attn_q\.weight"),
    ],
)
def test_inconsistent_manifest_is_named(split_dirs, tmp_path, change, message):
    directory = _copy_subset(split_dirs("llama-tiny"), tmp_path / "node", [])
    _rewrite_manifest(directory, change)
    with pytest.raises(ModelFileError, match=message):
        ShardSet.open(directory)


def test_missing_or_malformed_manifest(split_dirs, tmp_path):
    with pytest.raises(ModelFileError, match=r"no manifest\.json"):
        ShardSet.open(tmp_path)
    directory = _copy_subset(split_dirs("llama-tiny"), tmp_path / "node", [])
    (directory / MANIFEST_FILE).write_text('{"format_version": 1, "shards": [')
    with pytest.raises(ModelFileError, match="not valid JSON"):
        ShardSet.open(directory)
    (directory / MANIFEST_FILE).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ModelFileError, match="format version 99"):
        ShardSet.open(directory)


def test_damaged_header_is_refused(split_dirs, tmp_path):
    directory = _copy_subset(split_dirs("llama-tiny"), tmp_path / "node", [0])
    header = directory / HEADER_FILE
    data = bytearray(header.read_bytes())
    data[len(data) // 2] ^= 0x01
    header.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"gguf_header\.bin: sha256"):
        ShardSet.open(directory)
    header.unlink()
    with pytest.raises(ModelFileError, match=r"gguf_header\.bin is missing"):
        ShardSet.open(directory)


def test_a_failed_write_leaves_no_partial_files(tiny_model, tmp_path, monkeypatch):
    real_replace = os.replace
    calls = []

    def fail_on_second_shard(source, target):
        calls.append(target)
        if str(target).endswith("shard_001.bin"):
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", fail_on_second_shard)
    with pytest.raises(ModelFileError, match="No space left"):
        split_gguf(tiny_model("llama-tiny"), tmp_path, shard_size_mb=TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == [HEADER_FILE, "shard_000.bin"]
    with pytest.raises(ModelFileError, match=r"no manifest\.json"):
        ShardSet.open(tmp_path)
    monkeypatch.setattr(os, "replace", real_replace)
    manifest = split_gguf(tiny_model("llama-tiny"), tmp_path, shard_size_mb=TINY)
    assert ShardSet.open(tmp_path).layers_held() == [(0, manifest.block_count)]
    assert not list(tmp_path.glob("*.tmp"))


def test_shard_command_and_summary(tiny_model, tmp_path):
    manifest = shard_command(tiny_model("gemma3-tiny"), tmp_path / "out", 1.2)
    text = describe(manifest)
    assert f"{manifest.block_count} layers" in text
    assert "tied" in text and "copy of token_embd.weight" in text
    assert len(text.splitlines()) == len(manifest.shards) + 4


def test_bad_shard_size_and_bad_source(tiny_model, tmp_path):
    from swarm.errors import SwarmError

    with pytest.raises(SwarmError, match="shard size"):
        split_gguf(tiny_model("llama-tiny"), tmp_path, shard_size_mb=0)
    with pytest.raises(ModelFileError, match="not found"):
        split_gguf(tmp_path / "absent.gguf", tmp_path / "out")
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(ModelFileError, match="cannot parse"):
        split_gguf(text, tmp_path / "out")


def test_shards_module_does_not_import_jax():
    code = "import sys, swarm.shards; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.realmodel
def test_split_smollm2(smollm2_path, tmp_path):
    from swarm.engine import Engine, EngineSettings
    from swarm.model_config import ModelConfig

    manifest = split_gguf(smollm2_path, tmp_path / "all", shard_size_mb=32)
    assert manifest.block_count == 30 and manifest.tied_output
    # Shard 0 is the Q8_0 embedding plus one layer; the last is one layer, the head and
    # the embedding's copy; no shard exceeds 32 MiB.
    assert [s.layers for s in manifest.shards] == [(0, 1), (1, 16), (16, 29), (29, 30)]
    assert all(shard.size <= 32 * 2**20 for shard in manifest.shards)
    assert manifest.shards[-1].copies[0].name == EMBEDDING
    assert ShardSet.open(tmp_path / "all").layers_held() == [(0, 30)]

    needed = select_shards(manifest, (20, 30))
    node = ShardSet.open(_copy_subset(tmp_path / "all", tmp_path / "node", needed))
    assert needed == [2, 3]
    assert node.layers_held() == [(16, 30)]
    assert node.has_head
    gguf = node.as_gguf()
    config = ModelConfig.from_metadata(gguf.metadata, tensor_names=frozenset(gguf.tensors))
    original = GGUFFile.open(smollm2_path)
    hidden = np.random.default_rng(0).standard_normal((5, config.d_model)).astype(np.float32)
    results = []
    for source in (gguf, original):
        engine = Engine.load(source, config, (20, 30), EngineSettings(kv_cache="f32"))
        results.append(engine.forward(hidden, 0, engine.new_cache(256), all_logits=True)[0])
    assert np.array_equal(results[0], results[1])
