"""swarm.load_progress: the loading bar's percentage, phase by phase."""

from __future__ import annotations

import json
import time

import pytest

from swarm.engine import Engine, EngineSettings
from swarm.gguf_file import GGUFFile
from swarm.load_progress import DEFAULT_SECONDS, HISTORY_FILE, PHASES, LoadProgress
from swarm.model_config import ModelConfig


def test_counted_phases_follow_their_count_and_the_bar_only_grows(tmp_path) -> None:
    progress = LoadProgress("m", tmp_path)
    first = progress.snapshot()
    assert first["phase"] == "model" and 0 <= first["percent"] < 10
    progress.phase("weights", unit="bytes")
    start = progress.snapshot()["percent"]
    seen = []
    for done in range(0, 101, 10):
        progress.advance(done, 100)
        seen.append(progress.snapshot())
    assert [s["done"] for s in seen] == list(range(0, 101, 10))
    assert all(s["total"] == 100 and s["unit"] == "bytes" for s in seen)
    percents = [s["percent"] for s in seen]
    assert percents == sorted(percents) and percents[0] == pytest.approx(start, abs=0.1)
    # With the default split, the weights phase ends where the compile phase begins.
    total = sum(DEFAULT_SECONDS.values())
    end_of_weights = 100 * (DEFAULT_SECONDS["model"] + DEFAULT_SECONDS["weights"]) / total
    assert percents[-1] == pytest.approx(end_of_weights, abs=0.1)
    progress.phase("compile")
    assert progress.snapshot()["percent"] == pytest.approx(end_of_weights, abs=0.5)
    progress.finish()
    assert progress.snapshot()["percent"] == 100.0


def test_an_uncounted_phase_follows_the_last_loads_time_but_never_ends_early(tmp_path, monkeypatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    history = {"m": {"model": 0.0, "weights": 2.0, "compile": 6.0, "peers": 0.0}}
    (tmp_path / HISTORY_FILE).write_text(json.dumps(history))
    progress = LoadProgress("m", tmp_path)
    progress.phase("compile")
    weights_share = 100 * 2.0 / (2.0 + 6.0 + 0.05 + 0.05)
    clock[0] += 3.0  # half of last time's compile
    assert progress.snapshot()["percent"] == pytest.approx(
        weights_share + 0.5 * (100 - weights_share - 0.6), abs=1
    )
    clock[0] += 60.0  # much slower than last time: held below the end of the phase
    held = progress.snapshot()["percent"]
    assert held < 100 and held == pytest.approx(weights_share + 0.95 * (100 - weights_share - 0.6), abs=1)
    assert progress.snapshot()["elapsed_s"] == 63.0


def test_finish_records_each_phases_time_for_the_next_load(tmp_path, monkeypatch) -> None:
    clock = [50.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    (tmp_path / HISTORY_FILE).write_text(json.dumps({"other": {"weights": 9.0}}))
    progress = LoadProgress("m", tmp_path)
    for phase, seconds in (("model", 1.0), ("weights", 3.0), ("compile", 8.0)):
        if phase != "model":
            progress.phase(phase)
        clock[0] += seconds
    progress.finish()
    stored = json.loads((tmp_path / HISTORY_FILE).read_text())
    assert stored["m"] == {"model": 1.0, "weights": 3.0, "compile": 8.0, "peers": 0.0}
    assert stored["other"] == {"weights": 9.0}
    assert LoadProgress("m", tmp_path).expected["compile"] == 8.0


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"m": {"weights": -5, "compile": "x"}}'])
def test_a_damaged_history_is_ignored(tmp_path, content: str) -> None:
    (tmp_path / HISTORY_FILE).write_text(content)
    progress = LoadProgress("m", tmp_path)
    assert progress.expected == DEFAULT_SECONDS
    with pytest.raises(ValueError, match="unknown load phase"):
        progress.phase("dreaming")
    assert set(PHASES) == set(DEFAULT_SECONDS)


def test_loading_weights_reports_every_byte_it_reads(tiny_model) -> None:
    gguf = GGUFFile.open(tiny_model("gemma3-tiny"))
    config = ModelConfig.from_metadata(gguf.metadata, tensor_names=frozenset(gguf.tensors))
    heard: list[tuple[int, int]] = []
    for layers in ((0, config.n_layers), (1, config.n_layers - 1)):
        heard.clear()
        Engine.load(
            gguf, config, layers, EngineSettings(), progress=lambda done, total: heard.append((done, total))
        )
        totals = {total for _, total in heard}
        assert len(totals) == 1
        done = [d for d, _ in heard]
        assert done == sorted(done) and done[-1] == totals.pop()
    # A middle range reads no embedding, norm or head: its total is only its layers' tensors.
    middle = range(1, config.n_layers - 1)
    assert heard[-1][1] == sum(
        info.nbytes
        for name, info in gguf.tensors.items()
        if any(name.startswith(f"blk.{i}.") for i in middle)
    )
