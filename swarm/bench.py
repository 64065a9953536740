"""`swarm bench`: prefill and decode speed, peak memory and compile time, with an
optional llama.cpp baseline measured in the same run on the same model and prompt.

The baseline runs in a child process (`python -m swarm.bench --llama-cpp-child`) so
each side's peak RSS is its own. Both sides warm up first and report the median of
the runs; ratios are ours over llama.cpp's. The machine may be shared and noisy, so
only same-run ratios mean anything.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from swarm.errors import SwarmError
from swarm.sampling import SamplingParams

BENCH_TEXT = (
    "The history of computing is a story of people finding new ways to pool their effort. "
    "Early machines filled rooms and served a single purpose; later ones fit on a desk and "
    "ran anything a programmer could describe. Networks then joined those machines, and "
    "work that no single computer could finish was split across many. "
)


@dataclass(frozen=True)
class BenchOptions:
    prompt_tokens: int = 128
    gen_tokens: int = 128
    runs: int = 3
    baseline: str | None = None
    threads: int | None = None


def bench_prompt(tokenizer, count: int) -> list[int]:
    """A deterministic prompt of exactly `count` tokens of ordinary text."""
    ids = tokenizer.encode(BENCH_TEXT, add_bos=False, parse_special=False)
    repeated = (ids * (count // max(len(ids), 1) + 1))[:count]
    if tokenizer.bos_id is not None and tokenizer.add_bos:
        repeated = [tokenizer.bos_id, *repeated[: count - 1]]
    return repeated


def _peak_rss_mb() -> float:
    """Peak resident memory of this process image in MiB.

    VmHWM, not getrusage: Linux carries ru_maxrss across exec, so a child started
    from a large parent would report the parent's peak as its own.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _measure_swarm(engine, prompt: list[int], options: BenchOptions) -> dict[str, Any]:
    """Prefill and decode as a node runs a request: in a row of the shared batch cache
    (swarm.batching), alone."""
    from swarm.batching import SlotBatch

    needed = len(prompt) + options.gen_tokens + 1
    batch = SlotBatch(engine, 1, engine.cache_capacity(needed))
    batch.warm_up()
    batch.stop_preparing()  # no compile in the background while timing
    prompt_array = np.asarray(prompt, np.int32)

    def one_run() -> tuple[float, float]:
        slot = batch.acquire(needed)
        try:
            began = time.perf_counter()
            logits = batch.prefill(slot, prompt_array, 0)
            prefill = time.perf_counter() - began
            position = len(prompt)
            began = time.perf_counter()
            for _ in range(options.gen_tokens):
                token = np.int32(np.argmax(logits))
                logits = batch.run(slot, token, position)
                position += 1
            return prefill, time.perf_counter() - began
        finally:
            batch.release(slot)

    one_run()  # compiles prefill and decode
    batch.stop_preparing()
    runs = [one_run() for _ in range(options.runs)]
    return {
        "prefill_tok_s": len(prompt) / statistics.median(r[0] for r in runs),
        "decode_tok_s": options.gen_tokens / statistics.median(r[1] for r in runs),
        "peak_rss_mb": _peak_rss_mb(),
        "compile_s": engine.compile_seconds,
    }


def _measure_llama_cpp(
    path: str, prompt: list[int], gen_tokens: int, runs: int, threads: int, sampled: bool = False
) -> dict[str, Any]:
    """Greedy decode (argmax of each step's logits), or with `sampled` llama.cpp's own
    sampler chain at the defaults a swarm node samples with (`SamplingParams()`), so
    that its sampling cost counts as ours does."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=len(prompt) + gen_tokens + 16,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    n_vocab = llm.n_vocab()
    chain = SamplingParams()  # the node's defaults, for `sampled`

    def one_run() -> tuple[float, float]:
        llm.reset()
        began = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - began
        began = time.perf_counter()
        for _ in range(gen_tokens):
            if sampled:
                token = llm.sample(
                    top_k=chain.top_k, top_p=chain.top_p, min_p=chain.min_p, temp=chain.temperature
                )
            else:
                token = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))
            llm.eval([token])
        return prefill, time.perf_counter() - began

    one_run()
    measured = [one_run() for _ in range(runs)]
    return {
        "prefill_tok_s": len(prompt) / statistics.median(r[0] for r in measured),
        "decode_tok_s": gen_tokens / statistics.median(r[1] for r in measured),
        "peak_rss_mb": _peak_rss_mb(),
        "version": llama_cpp.__version__,
        "threads": threads,
        "sampled": sampled,
    }


def weight_bytes(weights: Any) -> int:
    """Bytes the engine's weights hold in memory (every array once: a tied head is the
    embedding's own array)."""
    import jax

    unique = {id(leaf): leaf for leaf in jax.tree.leaves(weights) if hasattr(leaf, "nbytes")}
    return sum(int(leaf.nbytes) for leaf in unique.values())


def kernels_in_use() -> str:
    """What runs the products: "cpu avx512-vnni", "cpu portable", "cpu xla" (no kernel
    library could be built), or the accelerator backend's name."""
    import jax

    from kernels import cpu

    backend = jax.default_backend()
    if backend != "cpu":
        return backend
    return f"cpu {cpu.isa() or 'xla'}"


def machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The machine the figures come from, as "AMD EPYC (family 25, model 17), 2 CPUs": the
    CPU model (with its family and model numbers on x86, where a virtual machine may name
    no more than the brand), the CPUs this process may run on, and the accelerator when
    the backend is not the CPU. Figures from different machines do not compare."""
    import platform

    import jax

    from swarm.engine import usable_cpus

    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                if fields:
                    break  # the first CPU's block is enough
                continue
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    elif "CPU part" in fields:
        name += f" (part {fields['CPU part']})"
    usable = usable_cpus()
    described = f"{name}, {usable} CPU{'s' if usable != 1 else ''}"
    if jax.default_backend() != "cpu":
        described = f"{jax.devices()[0].device_kind} on {described}"
    return described


def llama_cpp_baseline(
    path: str,
    prompt: list[int],
    gen_tokens: int,
    runs: int,
    threads: int | None = None,
    sampled: bool = False,
) -> dict[str, Any]:
    """llama.cpp's prefill and decode speed on the same model and prompt, measured in a
    child process (its peak RSS its own); SwarmError if it cannot run. Decode is greedy,
    or with `sampled` through llama.cpp's sampler chain at a node's default settings."""
    job = {
        "path": path,
        "prompt": prompt,
        "gen_tokens": gen_tokens,
        "runs": runs,
        "threads": threads or os.cpu_count() or 1,
        "sampled": sampled,
    }
    child = subprocess.run(
        [sys.executable, "-m", "swarm.bench", "--llama-cpp-child", json.dumps(job)],
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name
        hint = (
            ": it ran an instruction this CPU (or its VM) does not allow, such as AMX listed but "
            "not enabled; rebuild llama-cpp-python with CMAKE_ARGS=-DGGML_NATIVE=OFF and the "
            "instruction sets named (README: swarm bench)"
            if name == "SIGILL"
            else ""
        )
        raise SwarmError(f"llama.cpp baseline crashed with {name}{hint}")
    if child.returncode != 0:
        last = (child.stderr.strip().splitlines() or ["no output"])[-1]
        raise SwarmError(f"llama.cpp baseline failed (install the bench extra): {last}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def run_bench(model_name: str, data_dir: Path, settings, options: BenchOptions) -> dict[str, Any]:
    from swarm.loader import open_model

    if options.prompt_tokens < 1 or options.gen_tokens < 1 or options.runs < 1:
        raise SwarmError("--prompt-tokens, --gen-tokens and --runs must be at least 1")
    model = open_model(model_name, data_dir)
    prompt = bench_prompt(model.tokenizer, options.prompt_tokens)
    engine = model.engine(settings)
    report: dict[str, Any] = {"model": model_name}
    report.update(_measure_swarm(engine, prompt, options))
    report["weights_mb"] = weight_bytes(engine.weights) / 2**20
    report["gguf_tensor_mb"] = sum(t.nbytes for t in model.gguf.tensors.values()) / 2**20
    report["weights_over_gguf"] = report["weights_mb"] / report["gguf_tensor_mb"]
    report["kernels"] = kernels_in_use()
    report["machine"] = machine()
    report["prompt_tokens"] = len(prompt)
    report["gen_tokens"] = options.gen_tokens
    report["runs"] = options.runs
    if options.baseline == "llama-cpp":
        del engine
        baseline = llama_cpp_baseline(
            str(model.path), prompt, options.gen_tokens, options.runs, options.threads
        )
        report["baseline"] = baseline
        report["ratio"] = {
            "prefill": report["prefill_tok_s"] / baseline["prefill_tok_s"],
            "decode": report["decode_tok_s"] / baseline["decode_tok_s"],
        }
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"model {report['model']}: {report['prompt_tokens']}-token prompt, "
        f"{report['gen_tokens']} generated, median of {report['runs']} runs"
        + (f", kernels {report['kernels']}" if "kernels" in report else "")
    ]
    if "machine" in report:
        lines.append(f"on {report['machine']}")
    header = f"{'':<12}{'prefill tok/s':>15}{'decode tok/s':>15}{'peak RSS MB':>13}"
    lines.append(header)
    lines.append(
        f"{'swarm':<12}{report['prefill_tok_s']:>15.1f}{report['decode_tok_s']:>15.1f}"
        f"{report['peak_rss_mb']:>13.0f}"
    )
    if "baseline" in report:
        base = report["baseline"]
        lines.append(
            f"{'llama.cpp':<12}{base['prefill_tok_s']:>15.1f}{base['decode_tok_s']:>15.1f}"
            f"{base['peak_rss_mb']:>13.0f}"
        )
        ratio = report["ratio"]
        lines.append(f"{'ratio':<12}{ratio['prefill']:>14.2f}x{ratio['decode']:>14.2f}x")
    lines.append(
        f"weights in memory {report['weights_mb']:.0f} MB = {report['weights_over_gguf']:.2f}x"
        f" the GGUF's {report['gguf_tensor_mb']:.0f} MB of tensors"
    )
    lines.append(f"compile time {report['compile_s']:.1f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--llama-cpp-child":
        job = json.loads(sys.argv[2])
        print(
            json.dumps(
                _measure_llama_cpp(
                    job["path"], job["prompt"], job["gen_tokens"], job["runs"], job["threads"], job["sampled"]
                )
            )
        )
    else:
        sys.exit("usage: python -m swarm.bench --llama-cpp-child JOB_JSON (use `swarm bench` instead)")
