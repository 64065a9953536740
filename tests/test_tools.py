"""The benchmark scripts users run from tools/: they run, and their reports add up."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import cpu
from swarm import bench
from swarm.engine import usable_cpus

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
    assert report["machine"] == bench.machine()  # figures from another machine do not compare
    assert report["single_tok_s"] > 0 and report["aggregate_tok_s"] > 0
    assert report["aggregate_over_single"] == pytest.approx(
        report["aggregate_tok_s"] / report["single_tok_s"]
    )
    # One run: the median of the paired ratios is that run's ratio of the two.
    assert report["aggregate_over_single_paired"] == pytest.approx(report["aggregate_over_single"], abs=1e-3)
    assert report["from_submission_paired"] == pytest.approx(
        report["aggregate_over_single_from_submission"], abs=1e-3
    )
    # Each stream's span lies inside the first-to-last window: their rates add up to more.
    assert report["streams_summed_tok_s"] >= report["aggregate_tok_s"]
    assert report["streams_summed_over_single"] == pytest.approx(
        report["streams_summed_tok_s"] / report["single_tok_s"]
    )
    assert len(report["first_token_ms"]) == 3
    assert report["batch"]["widest"] == 3  # the three streams shared steps
    spent = report["time_spent"]["concurrent"]
    assert spent["step_ms"] > 0 and spent["prompt_forward_ms"] > 0
    assert 0 < spent["ramp_share"] < 1
    assert report["time_spent"]["single"]["step_ms"] > 0
    for label in ("long_prompt_chunked", "long_prompt_whole"):
        assert report[label]["long_prompt_first_token_ms"] > 0


def test_bench_prefix_times_a_node_and_a_lone_request(smollm2_path, data_dir):
    args = ["tools/bench_prefix.py", "--prompt-tokens", "140", "--runs", "1", "--follow-up", "100"]
    done = _run(args, data_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["prompt_tokens"] == 140
    assert report["machine"] == bench.machine()
    # A row of the node's batch cache, a cache of its own, and a chat's next turn.
    for label, warm in (("", "cached_"), ("own_cache_", "own_cache_cached_"), ("follow_up_", "follow_up_")):
        cold, cached = report[f"{label}cold_first_token_ms"], report[f"{warm}first_token_ms"]
        assert cold > 0 and cached > 0
        assert report[f"{label}speedup"] == pytest.approx(cold / cached)
    # The next turn: prompt, 100-token reply, 16-token question; the reply's whole blocks
    # were kept (all its positions but the last token's ran).
    assert report["follow_up_prompt_tokens"] == 140 + 100 + 16
    assert report["follow_up_cached_tokens"] == (140 + 100 - 1) // 64 * 64


@pytest.mark.parametrize(
    ("tool", "args", "complaint"),
    [
        # a prompt past a node's batch row
        ("bench_prefix.py", ["--prompt-tokens", "2048"], "--prompt-tokens must be 1 to 2047"),
        ("bench_prefix.py", ["--prompt-tokens", "0"], "--prompt-tokens must be 1 to 2047"),
        ("bench_prefix.py", ["--runs", "0"], "--runs must be at least 1"),
        ("bench_prefix.py", ["--follow-up", "1600"], "--follow-up must be 0 to 1519"),
        ("bench_batch.py", ["--runs", "0"], "--runs must be at least 1"),
        ("bench_batch.py", ["--gen-tokens", "1"], "--gen-tokens must be at least 2"),
        ("bench_batch.py", ["--long-prompt", "-1"], "--long-prompt must be 0 or more"),
    ],
)
def test_benchmarks_refuse_bad_arguments_before_loading_anything(tool, args, complaint, tmp_path):
    done = _run([f"tools/{tool}", *args], tmp_path)
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


X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 50.00
CPU implementer\t: 0x41
CPU part\t: 0xd0c
"""


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (X86_CPUINFO, "AMD EPYC (family 25, model 17), "),  # a VM's bare brand, told apart by the numbers
        (ARM_CPUINFO, " (part 0xd0c), "),  # no model name: the machine's type and the core's part
    ],
)
def test_benchmarks_name_the_machine_they_ran_on(tmp_path, text, named):
    (tmp_path / "cpuinfo").write_text(text)
    described = bench.machine(tmp_path / "cpuinfo")
    usable = usable_cpus()
    assert named in described
    assert described.endswith(f"{usable} CPU{'s' if usable != 1 else ''}")


def test_a_machine_without_cpuinfo_is_still_named(tmp_path):
    described = bench.machine(tmp_path / "missing")
    assert described and not described.startswith(",") and "CPU" in described


def _perf_can_record() -> bool:
    """Whether `perf record` may sample a process of ours here (installed, and allowed by
    perf_event_paranoid or root)."""
    if shutil.which("perf") is None:
        return False
    done = subprocess.run(
        ["perf", "record", "-o", os.devnull, "--", "true"], capture_output=True, text=True, timeout=60
    )
    return done.returncode == 0


def _profiles(args: list[str], data_dir: Path) -> list[dict]:
    """profile_step.py's JSON for `args`, each profile's parts checked to add up."""
    if not _perf_can_record():
        pytest.skip("needs Linux perf, allowed to sample this user's processes")
    done = _run(["tools/profile_step.py", *args, "--seconds", "2", "--json"], data_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    profiles = json.loads(done.stdout)
    for profile in profiles:
        parts = profile["parts"]
        assert profile["step_ms"] > 0 and profile["cpu_ms_per_step"] > 0
        assert sum(part["share"] for part in parts.values()) == pytest.approx(1.0)
        assert sum(part["cpu_ms_per_step"] for part in parts.values()) == pytest.approx(
            profile["cpu_ms_per_step"]
        )
    return profiles


@pytest.mark.slow
def test_profile_step_splits_a_step_into_its_parts(smollm2_path, data_dir):
    profiles = _profiles(["--rows", "1,4", "--position", "32"], data_dir)
    assert [p["rows"] for p in profiles] == [1, 4]
    for profile in profiles:
        parts = profile["parts"]
        if cpu.available():  # the products run on the kernels, and are most of a step
            assert parts["layer matmuls"]["share"] > 0.2
            assert "vocabulary head (Q8_0 matmul)" in parts and "attention" in parts


@pytest.mark.slow
def test_profile_step_splits_a_prompt_chunk_into_its_parts(smollm2_path, data_dir):
    (profile,) = _profiles(["--prompt", "64", "--position", "32"], data_dir)
    parts = profile["parts"]
    if cpu.available():  # a prompt's time is its products' and its attention's
        assert parts["layer matmuls"]["share"] > 0.3
        assert "attention" in parts


def _tool_module(name: str):
    """tools/NAME.py imported as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "symbol, part",
    [
        # The caller's wait for a run's last tasks is the pool's, not the kernel's that ran it.
        ("swarm_cpu::ThreadPool::AwaitTasks", "pool: the caller waiting for a run's last tasks"),
        (
            "std::thread::_State_impl<std::thread::_Invoker<std::tuple<swarm_cpu::ThreadPool::ThreadPool(int)"
            "::{lambda()#1}> > >::_M_run",
            "pool: workers waiting for a run",
        ),
        ("swarm_cpu::QuantizeRow", "activation quantizer"),
        ("swarm_cpu::(anonymous namespace)::Checked<swarm_cpu::Q4_1>", "activation quantizer"),
        ("swarm_cpu::(anonymous namespace)::Checked<swarm_cpu::Q8_0>", "vocabulary head (Q8_0 matmul)"),
        (
            "swarm_cpu::(anonymous namespace)::ForEachRun<swarm_cpu::(anonymous namespace)::Product<swarm_cpu::Q4_1>"
            "(float const*, long, long)::{lambda(int)#1}::operator()",
            "layer matmuls",
        ),
        ("swarm_cpu::(anonymous namespace)::PairOf<unsigned short, 64>", "attention"),
    ],
)
def test_profile_step_counts_each_kernel_symbol_for_its_part(symbol, part):
    profile_step = _tool_module("profile_step")
    assert profile_step.part_of("qmatmul-0123456789abcdef.so", symbol) == part


@pytest.mark.parametrize(
    "args, complaint",
    [(["--prompt", "-1"], "--prompt"), (["--rows", "1,x"], "--rows"), (["--position", "0"], "--position")],
)
def test_profile_step_refuses_bad_arguments(args, complaint, data_dir):
    done = _run(["tools/profile_step.py", *args], data_dir)
    assert done.returncode == 2
    assert complaint in done.stderr


def test_bench_kernels_sets_each_product_against_the_cpus_peak(smollm2_path, data_dir):
    if not cpu.available():
        pytest.skip(cpu.unavailable_reason())
    done = _run(
        [
            "tools/bench_kernels.py", "--models", "smollm2-135m", "--rows", "1", "--runs", "1",
            "--no-step", "--json", "--data-dir", str(data_dir),
        ],
        data_dir,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines[0] == {"machine": bench.machine(), "kernels": cpu.isa(), "kernel_threads": cpu.threads()}
    lines = lines[1:]
    peaks = [line for line in lines if "int8_peak" in line]
    assert [peak["when"] for peak in peaks] == ["start", "end"]
    for peak in peaks:
        if peak["int8_peak"] is not None:  # a C++ compiler and an 8-bit dot product on this build
            assert peak["int8_peak"]["gmac_s"] > 0 and peak["int8_peak"]["threads"] == cpu.threads()
    rows = [line for line in lines if "int8_peak" not in line]
    assert {row["matrix"] for row in rows} >= {"ffn_down", "head"}
    for row in rows:
        n, k = row["shape"]
        assert row["gmac_s"] == pytest.approx(row["rows"] * n * k / row["ours_us"] / 1e3)


def test_swarm_bench_table_names_the_machine_under_its_title():
    report = {
        "model": "smollm2-135m", "prompt_tokens": 128, "gen_tokens": 128, "runs": 3,
        "kernels": "cpu avx512-vnni", "machine": "AMD EPYC (family 25, model 17), 2 CPUs",
        "prefill_tok_s": 1978.4, "decode_tok_s": 167.2, "peak_rss_mb": 430.0,
        "weights_mb": 92.0, "gguf_tensor_mb": 92.0, "weights_over_gguf": 1.0, "compile_s": 1.4,
    }  # fmt: skip
    lines = bench.format_table(report).splitlines()
    assert lines[0].endswith("kernels cpu avx512-vnni")
    assert lines[1] == "on AMD EPYC (family 25, model 17), 2 CPUs"
