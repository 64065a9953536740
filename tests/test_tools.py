"""The benchmark scripts users run from tools/: they run, and their reports add up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(args: list[str], data_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SWARM_NODE_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )


def test_bench_batch_reports_throughput_and_where_its_time_goes(smollm2_path, data_dir):
    done = _run(
        [
            "tools/bench_batch.py",
            "--streams", "3", "--gen-tokens", "6", "--prompt-tokens", "24",
            "--runs", "1", "--long-prompt", "40", "--chunk", "16",
        ],
        data_dir,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["streams"] == 3 and report["gen_tokens"] == 6
    assert report["single_tok_s"] > 0 and report["aggregate_tok_s"] > 0
    assert report["aggregate_over_single"] == pytest.approx(
        report["aggregate_tok_s"] / report["single_tok_s"]
    )
    assert len(report["first_token_ms"]) == 3
    assert report["batch"]["widest"] == 3  # the three streams shared steps
    spent = report["time_spent"]["concurrent"]
    assert spent["step_ms"] > 0 and spent["prompt_forward_ms"] > 0
    assert 0 < spent["ramp_share"] < 1
    assert report["time_spent"]["single"]["step_ms"] > 0
    for label in ("long_prompt_chunked", "long_prompt_whole"):
        assert report[label]["long_prompt_first_token_ms"] > 0


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--runs", "0"], "--runs must be at least 1"),
        (["--long-prompt", "-1"], "--long-prompt must be 0 or more"),
    ],
)
def test_bench_batch_refuses_bad_arguments_before_loading_anything(args, complaint, tmp_path):
    done = _run(["tools/bench_batch.py", *args], tmp_path)
    assert done.returncode == 2
    assert complaint in done.stderr


@pytest.mark.parametrize(
    ("returncode", "stderr", "expected"),
    [
        (-4, "", "crashed with SIGILL: it ran an instruction this CPU"),
        (-9, "", "crashed with SIGKILL"),
        (1, "Traceback ...\nModuleNotFoundError: No module named 'llama_cpp'", "install the bench extra"),
    ],
)
def test_a_failing_llama_cpp_baseline_says_why(monkeypatch, returncode, stderr, expected):
    """A llama.cpp build that dies on an instruction the CPU or VM refuses (AMX listed but
    not enabled) is named as such, not as a missing install."""
    from swarm import bench
    from swarm.errors import SwarmError

    def fake_run(command, **kwargs):
        return subprocess.CompletedProcess(command, returncode, stdout="", stderr=stderr)

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    with pytest.raises(SwarmError, match=expected):
        bench.llama_cpp_baseline("model.gguf", [1, 2, 3], gen_tokens=4, runs=1)
